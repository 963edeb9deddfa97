"""Ternary residual networks (Kundu et al. 2017): converting a trained int8 or float run into an
8-2 model (int8 activations, grouped ternary weights with integer scales) with ranked residual
edges that can be switched off at evaluation. A converter, not a training method: ``quantize``
(residual ternary decomposition of one weight), ``rank`` (perturbation, l2 and random rankings
of the residual edges), ``convert`` (a run folder in, a ternary run folder out), ``report``
(evaluation, model bits and operation counts against the 8-8 model). The inference itself is
integer-only: ``layers.ternary`` and ``kernels.ternary``."""
