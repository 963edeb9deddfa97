"""Integer numerics: the (v, e) tensor, shifts with rounding, the counter-based generator,
requantisation and number formats. Imports nothing else of intrain."""
