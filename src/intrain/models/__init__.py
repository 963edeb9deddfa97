"""Models: the zoo of layer-spec trees (``models.zoo``) and their two builds (``models.build``):
the integer model in a number format and its float32 twin."""

from intrain.models.build import FloatResidual, build_float_model, build_int_model
from intrain.models.zoo import MODELS, LayerSpec, model_spec

__all__ = ["MODELS", "FloatResidual", "LayerSpec", "build_float_model", "build_int_model", "model_spec"]
