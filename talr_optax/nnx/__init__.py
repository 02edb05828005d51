"""Flax NNX front end of ``talr_optax``: quantized layers, models, optimizer glue.

The only part of ``talr_optax`` that imports Flax (the ``nnx`` extra:
``pip install -e ".[nnx]"``).
"""

from talr_optax import _extras

# Before the first Flax import: a core-only install gets the pip command.
_extras.require("talr_optax.nnx", ("flax",), extra="nnx")

# pylint: disable=wrong-import-position
from talr_optax.nnx.batch_norm import reestimate_batch_norm
from talr_optax.nnx.export import export_integer_model
from talr_optax.nnx.labels import ACTIVATION_SCALE
from talr_optax.nnx.labels import BATCH_NORM
from talr_optax.nnx.labels import centers_fn_for
from talr_optax.nnx.labels import FULL_PRECISION
from talr_optax.nnx.labels import LABELS
from talr_optax.nnx.labels import layer_axes_for
from talr_optax.nnx.labels import levels_fn_for
from talr_optax.nnx.labels import param_labels
from talr_optax.nnx.labels import QUANTIZED
from talr_optax.nnx.layers import ACCEPTED_BITS
from talr_optax.nnx.layers import ActivationScale
from talr_optax.nnx.layers import Calibrated
from talr_optax.nnx.layers import QuantConv
from talr_optax.nnx.layers import QuantLayer
from talr_optax.nnx.layers import QuantLinear
from talr_optax.nnx.layers import quantized_layers
from talr_optax.nnx.layers import validate_layer_bits
from talr_optax.nnx.layers import WeightScale
from talr_optax.nnx.models import BasicBlock
from talr_optax.nnx.models import calibrate
from talr_optax.nnx.models import InvertedResidual
from talr_optax.nnx.models import load_full_precision
from talr_optax.nnx.models import MobileNetV2Tiny
from talr_optax.nnx.models import reset_calibration
from talr_optax.nnx.models import ResNet20
from talr_optax.nnx.models import SmallCNN
from talr_optax.nnx.serving import IntegerLayer
from talr_optax.nnx.serving import integer_model
from talr_optax.nnx.transformer import TransformerBlock
from talr_optax.nnx.transformer import TransformerLM
# pylint: enable=wrong-import-position

__all__ = [
    "ACCEPTED_BITS",
    "ACTIVATION_SCALE",
    "BATCH_NORM",
    "FULL_PRECISION",
    "LABELS",
    "QUANTIZED",
    "ActivationScale",
    "BasicBlock",
    "Calibrated",
    "IntegerLayer",
    "InvertedResidual",
    "MobileNetV2Tiny",
    "QuantConv",
    "QuantLayer",
    "QuantLinear",
    "ResNet20",
    "SmallCNN",
    "TransformerBlock",
    "TransformerLM",
    "WeightScale",
    "calibrate",
    "centers_fn_for",
    "export_integer_model",
    "integer_model",
    "layer_axes_for",
    "levels_fn_for",
    "load_full_precision",
    "param_labels",
    "quantized_layers",
    "reestimate_batch_norm",
    "reset_calibration",
    "validate_layer_bits",
]
