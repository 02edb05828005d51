"""Transition rate scheduling for models quantized with Qwix.

``qwix.quantize_model(model, qwix.QtProvider(rules), *inputs)`` turns a Flax
model into a quantization-aware training (QAT) model. This package gives TALR
what it needs from such a model:

* :func:`levels_fn_from_qwix`: the ``levels_fn`` for
  :func:`talr_optax.scale_by_talr`, exactly the integers Qwix's forward pass
  uses for each quantized weight, also for stacked layers under ``nnx.scan``;
  its ``layer_axes`` method is the optimizer's ``layer_axes`` (one rate per
  layer of a stacked weight);
* :func:`frozen_scale_rules`: rules with a frozen per-layer weight scale, so
  that the levels follow the paper's quantizer and change only when a weight
  crosses a transition point (Qwix recomputes the scale every step by default;
  a stacked weight gets one frozen scale for all its layers);
* :func:`quantized_weights` and :func:`frozen_step_size`: what Qwix quantizes
  and with which step size, for checks and diagnostics.

Requires Flax and Qwix: the ``qwix`` extra, ``pip install -e ".[qwix]"``.
"""

from talr_optax import _extras

# Before the first Flax or Qwix import: a core-only install gets the pip command.
_extras.require("talr_optax.qwix", ("flax", "qwix"), extra="qwix")

# pylint: disable=wrong-import-position
from talr_optax.qwix.levels import QwixLevelsFn
from talr_optax.qwix.levels import QwixWeight
from talr_optax.qwix.levels import levels_fn_from_qwix
from talr_optax.qwix.levels import quantized_weights
from talr_optax.qwix.rules import frozen_scale_rules
from talr_optax.qwix.rules import frozen_step_size
# pylint: enable=wrong-import-position

__all__ = [
    "QwixLevelsFn",
    "QwixWeight",
    "frozen_scale_rules",
    "frozen_step_size",
    "levels_fn_from_qwix",
    "quantized_weights",
]
