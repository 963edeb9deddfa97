"""The float twin's optimisers on integer masters, by the optimiser's name: NITI's ``--update
sgd|adamw`` and DFP16's integer-only ``--optimizer`` both take their update from here
(``methods.sgd_fixed``, ``methods.adamw_fixed``)."""

from __future__ import annotations

from intrain.methods.adamw_fixed import AdamWUpdate
from intrain.methods.sgd_fixed import FixedPointSgd

TWIN_UPDATES = {"sgd": FixedPointSgd, "adamw": AdamWUpdate}
