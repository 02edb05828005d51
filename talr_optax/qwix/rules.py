"""Qwix rules with a frozen per-layer weight scale: the paper's quantizer.

By default Qwix QAT recomputes each weight's scale from the current weights in
every forward pass (``absmax`` per output channel). A level then also changes
when the scale moves, without the weight crossing a transition point, and TALR
would adapt the learning rate to transitions the learning rate did not cause.
The paper (Lee et al., 2025) freezes one step size per layer,
``s = 3 * std(w)`` of the pretrained weights. Qwix can do the same with a fixed calibration
range, ``weight_calibration_method = "fixed,-A,A"``: its scale is then the
constant ``A / (2^(b-1) - 0.5)``, and its levels
``clip(round(w / scale), -2^(b-1), 2^(b-1) - 1)`` are the paper's
``round(clip(2^(b-1) * w / s, -2^(b-1), 2^(b-1) - 1))`` when
``scale = s / 2^(b-1)``, i.e. ``A = (1 - 2^-b) * s``.

A fixed range belongs to a rule, and a rule to a module path. The layers of a
scan over stacked layers share one module path, so they share one frozen range:
the nearest Qwix can express to a per-layer step size is one step size per
stacked weight, from the spread of all its layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from talr_optax import _checks
from talr_optax import _tree
from talr_optax.qwix.levels import quantized_weights

__all__ = ["frozen_scale_rules", "frozen_step_size"]

# How far (in units of the last kept bit) to look for a step size that Qwix
# reproduces exactly; the first candidate almost always works.
_MAX_SEARCH = 64


def _signed_int_bits(qtype: Any) -> int:
  """Bit width of a signed integer Qwix qtype (``"int2"``, ``jnp.int4``, ...)."""
  if isinstance(qtype, str):
    match = re.fullmatch(r"int([2-8])", qtype)
    if match:
      return int(match.group(1))
  else:
    try:
      dtype = jnp.dtype(qtype)
    except TypeError:
      dtype = None
    if dtype is not None and jnp.issubdtype(dtype, jnp.signedinteger):
      bits = jnp.iinfo(dtype).bits
      if 2 <= bits <= 8:
        return bits
  raise ValueError(
      "A frozen scale needs a signed integer weight_qtype of 2 to 8 bits "
      f"('int2', jnp.int4, jnp.int8, ...), got weight_qtype = {qtype!r}."
  )


def _fixed_method(bound: float) -> str:
  # repr() round-trips the float exactly through Qwix's float() parsing.
  return f"fixed,{-bound!r},{bound!r}"


def _qwix_scale(bound: float, qtype: Any, dtype: Any) -> float:
  """The scale Qwix computes from ``"fixed,-bound,bound"`` (public API)."""
  q = qwix.quantize(
      jnp.zeros((1,), dtype), qtype, calibration_method=_fixed_method(bound)
  )
  return float(np.asarray(q.scale).ravel()[0])


def _fixed_bound(step: float, bits: int, qtype: Any, dtype: Any) -> tuple[float, float]:
  """Fixed range ``A`` and the exact step size ``s`` it gives in Qwix.

  Qwix's scale is ``float(A) / (2^(b-1) - 0.5)`` rounded to ``dtype``; it must
  equal ``s / 2^(b-1)`` exactly for the levels to equal the paper's on every
  weight. Not every float ``s / 2^(b-1)`` is such a quotient, so ``s`` is
  rounded to ``p - b`` significant bits (``p`` = mantissa bits of ``dtype``,
  24 for float32; then ``A`` is exact) and, if needed, moved by a few units of
  that last bit. The relative change of ``s`` is below ``2^-(p - b - 1)``.
  """
  gamma = 2.0 ** (bits - 1)
  qmax = gamma - 0.5
  keep = jnp.finfo(dtype).nmant + 1 - bits
  target = step / gamma
  _, exponent = math.frexp(target)
  unit = 2.0 ** (exponent - keep)
  center = round(target / unit) * unit
  for i in range(_MAX_SEARCH):
    for candidate in (center,) if i == 0 else (center + i * unit, center - i * unit):
      bound = candidate * qmax
      if candidate <= 0 or float(np.asarray(bound, dtype)) != bound:
        continue
      if _qwix_scale(bound, qtype, dtype) == candidate:
        return bound, candidate * gamma
  raise RuntimeError(
      f"No fixed range gives Qwix the step size {step!r} for {qtype!r} "
      f"(qwix {qwix.__version__}); talr_optax.qwix needs updating."
  )


def _guess_weights(params: Any) -> dict[str, list[tuple[str, jax.Array]]]:
  """Module path -> ``[(param name, weight)]`` without running the model.

  The weight of a module is its parameter with the most dimensions, if it has
  at least 2: a kernel, not a bias or a norm's scale (vectors, or matrices
  under a stacked kernel of 3 dimensions). Ties are kept; the caller reports
  them.
  """
  by_module: dict[str, list[tuple[str, jax.Array]]] = {}
  for path, leaf in _tree.leaves_with_paths(params):
    value = _tree.unbox(leaf)
    if getattr(value, "ndim", 0) >= 2:
      module_path, _, name = path.rpartition("/")
      by_module.setdefault(module_path, []).append((name, value))
  return {
      module_path: [(n, w) for n, w in weights if w.ndim == max(v.ndim for _, v in weights)]
      for module_path, weights in by_module.items()
  }


def _weights_by_module(
    model: Any,
    rules: Sequence[qwix.QtRule],
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any],
) -> dict[str, list[tuple[str, jax.Array]]]:
  """Module path -> ``[(param name, weight)]`` of the weights to freeze."""
  if isinstance(model, nnx.Module):
    params = nnx.state(model, nnx.Param)
    if not (example_inputs or example_kwargs):
      return _guess_weights(params)
    # Exact: the weights Qwix quantizes under the user's rules.
    values = {path: _tree.unbox(leaf) for path, leaf in _tree.leaves_with_paths(params)}
    qt_model = qwix.quantize_model(
        model, qwix.QtProvider(rules), *example_inputs, **example_kwargs
    )
    found: dict[str, list[tuple[str, jax.Array]]] = {}
    for path in quantized_weights(qt_model, *example_inputs, **example_kwargs):
      module_path, _, name = path.rpartition("/")
      found.setdefault(module_path, []).append((name, values[path]))
    return found
  if isinstance(model, Mapping):
    if example_inputs or example_kwargs:
      raise ValueError(
          "example inputs are only used with NNX models; for Linen pass the "
          "variables or their params collection alone."
      )
    # Linen: the params collection nests by module path, as Qwix's rules do.
    # Accept the whole variables too: their paths would start with "params/"
    # and match no rule.
    params = model["params"] if isinstance(model.get("params"), Mapping) else model
    return _guess_weights(params)
  raise TypeError(
      "model must be the float nnx.Module, or the variables or params "
      f"collection (a mapping) of a Linen model, got {type(model).__name__}."
  )


def frozen_scale_rules(
    model: Any,
    rules: Sequence[qwix.QtRule],
    *example_inputs: Any,
    num_std: float = 3.0,
    **example_kwargs: Any,
) -> list[qwix.QtRule]:
  """Per-layer Qwix rules whose weight scale is frozen at ``num_std * std(w)``.

  For every layer whose weight the user's rules quantize, the returned list
  starts with copies of the rules that match that layer, restricted to its
  exact module path and, for rules with a ``weight_qtype``, with
  ``weight_calibration_method = "fixed,-A,A"`` chosen so that Qwix's levels
  are the paper's quantizer with the step size ``s = num_std * std(w)`` of the
  layer's current weights: for 2-bit weights ``round(clip(2 * w / s, -2, 1))``
  on every weight. The user's rules follow unchanged, so everything else they
  configure (activations, other layers, tiles, backward pass) is kept.

  Stacked layers (one parameter of shape ``(L, ...)`` applied by a scan over
  layers) share one module path, and a Qwix rule matches a module path with
  one fixed range: Qwix cannot give each layer slice its own frozen range. A
  stacked weight therefore gets one frozen step size for all its layers,
  ``s = num_std * std`` of all its layers' weights together; every layer's
  levels are the paper's quantizer with that ``s``.

  ``s`` is rounded to ``24 - b`` significant bits (float32 weights) so that
  Qwix's float arithmetic reproduces it exactly; :func:`frozen_step_size`
  returns the exact value (relative change below ``2^-(23 - b)``).

  Args:
    model: the full-precision model, before ``qwix.quantize_model``: an
      ``nnx.Module``, or a Linen model's variables or their ``params``
      collection.
    rules: the user's ``qwix.QtRule`` list (first match wins, as in Qwix).
    *example_inputs: optional, NNX only: inputs for one forward pass. With
      them the weights to freeze are the ones Qwix actually quantizes; without
      them, a module's weight is its parameter with the most dimensions (at
      least 2), which must be unique in a module a rule quantizes.
    num_std: step size in standard deviations of the layer's weights
      (the paper: 3).
    **example_kwargs: keyword inputs for the forward pass.

  Returns:
    A list of ``qwix.QtRule`` for ``qwix.QtProvider``.

  Raises:
    TypeError: if ``model`` is neither an ``nnx.Module`` nor a mapping.
    ValueError: for a ``num_std`` that is not a positive number, a non-integer
      weight qtype, weights with zero spread, a matching module holding
      several weights of the same rank (one rule per module cannot give each
      its own scale), or rules that quantize no weight of ``model``.
  """
  _checks.check_number(
      "num_std", num_std, 0.0, math.inf, low_open=True, high_open=True,
      owner="frozen_scale_rules",
  )
  rules = list(rules)
  frozen: list[qwix.QtRule] = []
  weights_by_module = _weights_by_module(model, rules, example_inputs, example_kwargs)
  for name, weights in weights_by_module.items():
    matching = [r for r in rules if re.fullmatch(r.module_path, name)]
    if not any(r.weight_qtype is not None for r in matching):
      continue
    if len(weights) > 1:
      raise ValueError(
          f"Module '{name}' holds several weights "
          f"({', '.join(str(n) for n, _ in weights)}); a Qwix rule selects a "
          "module, so one frozen range cannot match each one's std. Pass "
          "example inputs (NNX) so that only the quantized one is used, "
          "narrow the rule's module_path, or split the module."
      )
    _, w = weights[0]
    step = float(num_std * jnp.std(jnp.asarray(w, jnp.float32)))
    if not step > 0:
      raise ValueError(f"The weights of '{name}' have zero spread: std(w) = 0.")
    exact = "^" + re.escape(name) + "$"
    for rule in matching:
      if rule.weight_qtype is None:
        # Kept so that op-specific rules keep their precedence in this module.
        frozen.append(dataclasses.replace(rule, module_path=exact))
        continue
      bits = _signed_int_bits(rule.weight_qtype)
      bound, _ = _fixed_bound(step, bits, rule.weight_qtype, w.dtype)
      frozen.append(
          dataclasses.replace(
              rule, module_path=exact, weight_calibration_method=_fixed_method(bound)
          )
      )
  if not frozen:
    weight_rules = [r.module_path for r in rules if r.weight_qtype is not None]
    raise ValueError(
        "No rule with a weight_qtype matches a module of model, so nothing "
        f"would be frozen. Rule module_paths: {weight_rules}; modules with "
        f"weights: {sorted(weights_by_module)[:8]}."
    )
  return frozen + rules


def frozen_step_size(rule: qwix.QtRule, dtype: Any = jnp.float32) -> float:
  """Step size ``s`` of a frozen rule: its levels are the paper's with this ``s``.

  Args:
    rule: a rule from :func:`frozen_scale_rules` (a signed integer
      ``weight_qtype`` and a symmetric ``"fixed,-A,A"`` calibration).
    dtype: dtype of the weights the rule quantizes.

  Returns:
    ``2^(b-1) * scale``, with ``scale`` the one Qwix computes from the rule.
  """
  method, *args = rule.weight_calibration_method.lower().split(",")
  if method != "fixed" or len(args) != 2 or float(args[0]) != -float(args[1]):
    raise ValueError(
        "rule must have a symmetric fixed calibration 'fixed,-A,A', got "
        f"weight_calibration_method = {rule.weight_calibration_method!r}."
    )
  bits = _signed_int_bits(rule.weight_qtype)
  return _qwix_scale(float(args[1]), rule.weight_qtype, dtype) * 2.0 ** (bits - 1)
