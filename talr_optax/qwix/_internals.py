"""The one place that patches code during the recording pass (checked against qwix 0.1.8).

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

Weights of stacked layers (``nnx.scan`` or Linen ``nn.scan`` over layers) reach
the op as one slice per layer, and inside a real scan that slice is a tracer
whose values cannot be compared with the parameters. For the same pass we
therefore replace the public ``jax.lax.scan`` (which ``nnx.scan`` and
``nn.scan`` call) by a Python loop over concrete slices, as JAX itself does
under ``jax.disable_jit``. We do not use ``jax.disable_jit`` for the whole pass
because it changes which ops Qwix intercepts (e.g. ``x @ w`` is quantized only
with jit disabled), and the pass must see what training under ``jax.jit`` sees.

We also read the ``_unquantized_type`` attribute that ``qwix.quantize_model``
puts on the class of the model it returns.

``tests/test_qwix.py::test_qwix_internals_guard`` fails loudly when any of
this changes in a new JAX or Qwix release.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from qwix._src.core import qarray as _qarray

__all__ = ["QuantizeCall", "is_qwix_model", "record_quantize_calls"]

# The patched functions are module globals of Qwix and JAX: two recordings at
# once would see each other's calls.
_LOCK = threading.Lock()


class QuantizeCall(NamedTuple):
  """One quantization that Qwix performed in a forward pass.

  Attributes:
    operand: the array Qwix quantized (a weight, one layer slice of a stacked
      weight, or an activation).
    qtype: Qwix's logical quantized type, e.g. ``"int2"`` or ``jnp.int8``.
    channelwise_axes: axes of ``operand`` with one scale per index.
    tiled_axes: ``(axis, tile_size)`` pairs of subchannel (tiled) axes.
    calibration_method: e.g. ``"absmax"`` or ``"fixed,-0.3,0.3"``.
    stochastic: whether Qwix added rounding noise (never for QAT weights).
    qvalue: the integers Qwix produced from ``operand`` in this pass, or
      None if they could not be paired with the calibration.
    scan_indices: the iteration of each enclosing ``jax.lax.scan`` (unrolled
      for this pass), outermost first; ``()`` outside any scan.
  """

  operand: Any
  qtype: Any
  channelwise_axes: tuple[int, ...]
  tiled_axes: tuple[tuple[int, int | float], ...]
  calibration_method: str
  stochastic: bool
  qvalue: Any
  scan_indices: tuple[int, ...] = ()


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


def _unrolled_scan(scan: Callable[..., Any], owner: int, indices: list[int]
                   ) -> Callable[..., Any]:
  """``jax.lax.scan`` as a Python loop over concrete slices, for thread ``owner``.

  Scans of length 0, in other threads, or whose carry and inputs are all
  traced (a scan inside a ``jax.jit`` in the model) run the real ``scan``.
  Weights reach the body either sliced from ``xs`` (stacked layers) or
  through the carry (``nnx.scan`` passes broadcast state, e.g. one layer
  applied several times, there). ``indices`` receives the current iteration
  of every enclosing unrolled scan.
  """

  def unrolled(f, init, xs=None, length=None, reverse=False, unroll=1, **kwargs):
    leaves = jax.tree.leaves(xs)
    if length is None and leaves:
      length = leaves[0].shape[0]
    if (
        threading.get_ident() != owner
        or not length
        or all(isinstance(x, jax.core.Tracer) for x in leaves + jax.tree.leaves(init))
    ):
      return scan(f, init, xs, length, reverse, unroll, **kwargs)
    carry, ys = init, []
    for i in reversed(range(length)) if reverse else range(length):
      indices.append(i)
      try:
        carry, y = f(carry, jax.tree.map(lambda x, i=i: x[i], xs))
      finally:
        indices.pop()
      ys.append(y)
    if reverse:
      ys.reverse()
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)

  return unrolled


def record_quantize_calls(forward: Callable[[], Any]) -> list[QuantizeCall]:
  """Runs ``forward()`` and returns every quantization Qwix performed in it.

  ``jax.lax.scan`` is unrolled for the call (see the module docstring), so the
  weights of stacked layers reach Qwix as concrete slices.

  Args:
    forward: a function without arguments that runs a Qwix-quantized model
      once (eagerly, so that operands are concrete arrays).

  Returns:
    One :class:`QuantizeCall` per ``calibrate`` call, in call order.
  """
  events: list[tuple[str, Any, Any, tuple[int, ...]]] = []
  indices: list[int] = []
  calibrate = _qarray.calibrate
  quantize = _qarray.quantize_with_scale_zero_point
  scan = jax.lax.scan

  def recording_calibrate(array, how, *args, **kwargs):
    events.append(("calibrate", array, how, tuple(indices)))
    return calibrate(array, how, *args, **kwargs)

  def recording_quantize(array, *args, **kwargs):
    result = quantize(array, *args, **kwargs)
    events.append(("quantize", array, result.qvalue, ()))
    return result

  with _LOCK:
    _qarray.calibrate = recording_calibrate
    _qarray.quantize_with_scale_zero_point = recording_quantize
    jax.lax.scan = _unrolled_scan(scan, threading.get_ident(), indices)
    try:
      forward()
    finally:
      _qarray.calibrate = calibrate
      _qarray.quantize_with_scale_zero_point = quantize
      jax.lax.scan = scan

  calls = []
  for i, (kind, array, how, scan_indices) in enumerate(events):
    if kind != "calibrate":
      continue
    # The quantization of an operand follows its calibration in the same op.
    qvalue = next(
        (q for k, a, q, _ in events[i + 1 :] if k == "quantize" and _same_array(a, array)),
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
            scan_indices=scan_indices,
        )
    )
  return calls
