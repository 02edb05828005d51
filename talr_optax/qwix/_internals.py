"""The one place that touches private Qwix code (checked against qwix 0.1.8).

Qwix has no public hook that reports how it quantized a weight inside a
quantized op: the channelwise and tiled axes come from the op's dimension
numbers, the qtype, calibration and tile size from the matching rule. We learn
them by wrapping two functions of ``qwix._src.core.qarray`` for the duration of
one eager forward pass:

* ``calibrate(array, how)``: every quantization in a QAT forward pass starts
  here; ``how`` is a ``HowToQuantize`` with ``qtype``, ``channelwise_axes``,
  ``tiled_axes``, ``calibration_method`` and ``noise_fn``.
* ``quantize_with_scale_zero_point(array, qtype, scale, zero_point, ...)``:
  returns the ``QArray`` whose ``qvalue`` holds the integers the op uses; we
  keep them to check our replay against.

We also read the ``_unquantized_type`` attribute that ``qwix.quantize_model``
puts on the class of the model it returns.

``tests/test_qwix.py::test_qwix_internals_guard`` fails loudly when any of
this changes in a new Qwix release.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from qwix._src.core import qarray as _qarray

__all__ = ["QuantizeCall", "is_qwix_model", "record_quantize_calls"]

# The wrapped functions are module globals of Qwix: two recordings at once
# would see each other's calls.
_LOCK = threading.Lock()


class QuantizeCall(NamedTuple):
  """One quantization that Qwix performed in a forward pass.

  Attributes:
    operand: the array Qwix quantized (a weight or an activation).
    qtype: Qwix's logical quantized type, e.g. ``"int2"`` or ``jnp.int8``.
    channelwise_axes: axes with one scale per index.
    tiled_axes: ``(axis, tile_size)`` pairs of subchannel (tiled) axes.
    calibration_method: e.g. ``"absmax"`` or ``"fixed,-0.3,0.3"``.
    stochastic: whether Qwix added rounding noise (never for QAT weights).
    qvalue: the integers Qwix produced from ``operand`` in this pass, or
      None if they could not be paired with the calibration.
  """

  operand: Any
  qtype: Any
  channelwise_axes: tuple[int, ...]
  tiled_axes: tuple[tuple[int, int | float], ...]
  calibration_method: str
  stochastic: bool
  qvalue: Any


def is_qwix_model(model: Any) -> bool:
  """Whether ``model`` was returned by ``qwix.quantize_model`` (NNX or Linen)."""
  return hasattr(type(model), "_unquantized_type")


def _same_array(a: Any, b: Any) -> bool:
  """Identity, or equal concrete values (Qwix may pass a copy to the op)."""
  if a is b:
    return True
  if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
    return False
  return (
      getattr(a, "shape", None) == getattr(b, "shape", None)
      and getattr(a, "dtype", None) == getattr(b, "dtype", None)
      and bool(jnp.array_equal(a, b))
  )


def record_quantize_calls(forward: Callable[[], Any]) -> list[QuantizeCall]:
  """Runs ``forward()`` and returns every quantization Qwix performed in it.

  Args:
    forward: a function without arguments that runs a Qwix-quantized model
      once (eagerly, so that operands are concrete arrays).

  Returns:
    One :class:`QuantizeCall` per ``calibrate`` call, in call order.
  """
  events: list[tuple[str, Any, Any]] = []
  calibrate = _qarray.calibrate
  quantize = _qarray.quantize_with_scale_zero_point

  def recording_calibrate(array, how, *args, **kwargs):
    events.append(("calibrate", array, how))
    return calibrate(array, how, *args, **kwargs)

  def recording_quantize(array, *args, **kwargs):
    result = quantize(array, *args, **kwargs)
    events.append(("quantize", array, result.qvalue))
    return result

  with _LOCK:
    _qarray.calibrate = recording_calibrate
    _qarray.quantize_with_scale_zero_point = recording_quantize
    try:
      forward()
    finally:
      _qarray.calibrate = calibrate
      _qarray.quantize_with_scale_zero_point = quantize

  calls = []
  for i, (kind, array, how) in enumerate(events):
    if kind != "calibrate":
      continue
    # The quantization of an operand follows its calibration in the same op.
    qvalue = next(
        (q for k, a, q in events[i + 1 :] if k == "quantize" and _same_array(a, array)),
        None,
    )
    calls.append(
        QuantizeCall(
            operand=array,
            qtype=how.qtype,
            channelwise_axes=tuple(int(a) for a in how.channelwise_axes),
            tiled_axes=tuple((int(a), t) for a, t in dict(how.tiled_axes).items()),
            calibration_method=str(how.calibration_method),
            stochastic=how.noise_fn is not None,
            qvalue=qvalue,
        )
    )
  return calls
