"""Training methods: NITI int8 (and its int16-master preset), the float32 twin, and what they
share (the integer loss gradient, weight averaging, the integer update)."""
