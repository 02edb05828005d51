"""Transition-adaptive learning rate (TALR) as an Optax transformation.

In quantization-aware training the network only changes when a latent weight
crosses a transition point of its quantizer. :func:`scale_by_talr` measures,
every step and for every quantized tensor, the fraction ``k`` of weights whose
integer level changed, smooths it into ``K`` with an exponential moving
average, and adapts the learning rate ``U`` of that tensor so that ``K``
follows a scheduled target transition rate ``R`` (Lee et al., 2025).

It is the last stage of an ``optax.chain``, in place of
``optax.scale_by_learning_rate``. Previous levels are kept in the state as int8
(1 byte per quantized weight); all rates are float32 scalars.

:func:`track_transitions` records ``k`` and ``K`` without changing the
updates, so any QAT run (e.g. a plain-SGD baseline) can be measured the same
way.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from talr_optax.counting import count_transitions, count_transitions_packed

__all__ = [
    "ScaleByTALRState",
    "TrackTransitionsState",
    "scale_by_talr",
    "track_transitions",
]

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
LevelsFn = Callable[[Any], Any]

_RULES = ("multiplicative", "additive")
_GRANULARITIES = ("per_tensor", "global")
# Guards R / K in the multiplicative rule, as in the authors' code.
_EPS = 1e-8
# Rates are float32 whatever the params' dtype: a rate of 1e-4 per step is
# below the resolution of bfloat16 around 1.
_RATE_DTYPE = jnp.float32
_LEVEL_DTYPE = jnp.int8
# Largest float32. The multiplicative rule multiplies c by up to
# m + (1 - m) R / 1e-8 per step, so a tensor that stops moving (zero gradient,
# all weights beyond the clip range, a diverged tensor) overflows c to inf in a
# few hundred steps, and inf * (a zero gradient) is NaN. c and U saturate here.
_RATE_MAX = float(np.finfo(np.float32).max)


class ScaleByTALRState(NamedTuple):
  """State of :func:`scale_by_talr`.

  Per-tensor fields hold a pytree with the structure of the levels (that of
  the params, ``None`` on unquantized leaves) of float32 scalars; with
  ``granularity="global"`` they are float32 scalars.

  Attributes:
    talr_count: number of updates done (int32), the step of the target.
    prev_levels: int8 levels of every quantized weight at the last update.
    transition_rate: ``k``, fraction of weights that changed level.
    ema_transition_rate: ``K``, exponential moving average of ``k``.
    target_transition_rate: ``R``, the target used at the last update.
    talr: ``U``, the transition-adaptive learning rate.
    talr_scale: ``c``, the multiplier of the base learning rate
      (multiplicative rule; stays 1 with the additive rule).
  """

  talr_count: jax.Array
  prev_levels: Any
  transition_rate: Any
  ema_transition_rate: Any
  target_transition_rate: Any
  talr: Any
  talr_scale: Any


class TrackTransitionsState(NamedTuple):
  """State of :func:`track_transitions` (fields as in :class:`ScaleByTALRState`)."""

  prev_levels: Any
  transition_rate: Any
  ema_transition_rate: Any


# ----------------------------------------------------------------------------
# Argument validation. Values may be tracers under `optax.inject_hyperparams`
# (hyperparameters are re-injected inside jit); only concrete ones are checked.


def _concrete_float(value: Any) -> Optional[float]:
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if array.shape != () or not jnp.issubdtype(array.dtype, jnp.number):  # incl. bfloat16
    return None
  return float(array)


def _check_number(name: str, value: Any, low: float, high: float,
                  low_open: bool, high_open: bool) -> None:
  if isinstance(value, bool) or not (
      isinstance(value, (int, float, np.ndarray, np.generic, jax.Array))
  ):
    raise ValueError(f"{name} must be a number, got {name} = {value!r}.")
  x = _concrete_float(value)
  if x is None:
    if isinstance(value, jax.core.Tracer):
      return
    raise ValueError(f"{name} must be a scalar number, got {name} = {value!r}.")
  lo_ok = x > low if low_open else x >= low
  hi_ok = x < high if high_open else x <= high
  if not (lo_ok and hi_ok and np.isfinite(x)):
    interval = (
        ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
    )
    raise ValueError(
        f"{name} must be in {interval}, got {name} = {x!r}."
    )


def _check_scalar_or_schedule(name: str, value: Any, low_open: bool) -> None:
  if callable(value):
    return
  _check_number(name, value, 0.0, np.inf, low_open=low_open, high_open=True)


def _check_target_schedule(schedule: Callable[[jax.Array], Any]) -> None:
  """Checks a target schedule's value at step 0 when it is concrete."""
  try:
    value = schedule(jnp.asarray(0, jnp.int32))
  except Exception:  # pylint: disable=broad-except
    return  # not a plain count -> rate function; init will call it and say so
  x = _concrete_float(value)
  if x is not None and not (0.0 <= x <= 1.0):
    raise ValueError(
        "target_transition_rate must be in [0, 1] (a fraction of weights per"
        f" step); it is a schedule whose value at step 0 is {x!r}."
    )


def _not_callable_levels_fn(levels_fn: Any) -> ValueError:
  return ValueError(
      "levels_fn must be callable (params -> levels), got"
      f" levels_fn = {levels_fn!r}. Under optax.inject_hyperparams pass"
      " static_args=('levels_fn',): it treats every callable as a schedule."
  )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {name} = {value!r}.")


def _as_schedule(value: ScalarOrSchedule) -> Callable[[jax.Array], jax.Array]:
  if callable(value):
    return value
  return lambda count: value


# ----------------------------------------------------------------------------
# Levels: what `levels_fn` returned, matched leaf by leaf against the updates.


def _is_level_leaf(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _flatten_levels(levels: Any) -> tuple[list[Any], Any]:
  """Flattens levels keeping ``None`` / ``MaskedNode`` as leaves."""
  return jax.tree.flatten(levels, is_leaf=_is_level_leaf)


def _match(treedef: Any, tree: Any, what: str) -> list[Any]:
  """Leaves of ``tree`` (or subtrees) at the leaves of the levels' structure."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"levels_fn returned a pytree whose structure does not match the {what}:"
        f" levels_fn must return a pytree with the structure of params, holding"
        f" an integer array per quantized leaf and None elsewhere. ({e})"
    ) from None


def _array_leaf(x: Any) -> Any:
  """Unboxes a single-array subtree (e.g. a Flax Variable) to its array."""
  leaves = jax.tree.leaves(x)
  if len(leaves) == 1 and hasattr(leaves[0], "shape"):
    return leaves[0]
  return x


def _check_level(i: int, level: Any, param: Any) -> jax.Array:
  """Validates one level array and returns it as int8."""
  if not hasattr(level, "dtype") or not hasattr(level, "shape"):
    raise ValueError(
        f"levels_fn must return integer arrays (or None), got {type(level).__name__}"
        f" at leaf {i}."
    )
  if not jnp.issubdtype(level.dtype, jnp.integer):
    raise ValueError(
        f"levels_fn must return integer levels (any int dtype that fits int8),"
        f" got dtype {level.dtype} at leaf {i}: round and cast the quantizer"
        f" output, e.g. with talr_optax.weight_levels."
    )
  param = _array_leaf(param)
  if param is not None and hasattr(param, "shape") and tuple(level.shape) != tuple(param.shape):
    raise ValueError(
        f"levels at leaf {i} have shape {tuple(level.shape)}, but the param has"
        f" shape {tuple(param.shape)}: levels_fn must return one level per weight."
    )
  if level.dtype != _LEVEL_DTYPE and not isinstance(level, jax.core.Tracer):
    info = jnp.iinfo(_LEVEL_DTYPE)
    if level.size and (int(jnp.min(level)) < info.min or int(jnp.max(level)) > info.max):
      raise ValueError(
          f"levels at leaf {i} range over [{int(jnp.min(level))},"
          f" {int(jnp.max(level))}], which does not fit int8 [-128, 127];"
          " quantizers of at most 8 bits always fit."
      )
  return level.astype(_LEVEL_DTYPE)


def _levels_or_none(levels_fn: LevelsFn, params: Any, extra_args: dict[str, Any]
                    ) -> tuple[Any, bool]:
  """The raw levels, and whether they were passed as ``levels=`` (not computed)."""
  if "levels" in extra_args and extra_args["levels"] is not None:
    return extra_args["levels"], True
  if type(params).__name__ == "_ParamsPlaceholder":
    raise ValueError(
        "optax.tree.map_params cannot map a TALR state: its init calls"
        " levels_fn on the real params (a placeholder has no levels). To shard"
        " the state, call tx.init (or jax.jit(tx.init)) on sharded params:"
        " levels take the sharding of their params, rates are replicated."
    )
  if params is None:
    raise ValueError(
        "scale_by_talr needs params in update to compute the quantization"
        " levels: call tx.update(updates, state, params), or pass levels=..."
        " computed in the forward pass."
    )
  return levels_fn(params), False


def _read_levels(levels_fn: LevelsFn, params: Any, extra_args: dict[str, Any],
                 reference: Any) -> tuple[list[Any], Any, bool]:
  """Calls ``levels_fn`` and checks its output against ``reference`` leaf by leaf.

  Returns the int8 levels (``None`` for unquantized or masked leaves), the
  treedef of the levels, and whether they were passed as ``levels=``.
  """
  if not callable(levels_fn):
    raise _not_callable_levels_fn(levels_fn)
  raw, passed = _levels_or_none(levels_fn, params, extra_args)
  leaves, treedef = _flatten_levels(raw)
  matched = _match(treedef, reference, "params")
  out = []
  for i, (level, ref) in enumerate(zip(leaves, matched)):
    if level is None or _is_masked(level) or _is_masked(ref) or ref is None:
      out.append(None)
      continue
    if not hasattr(_array_leaf(ref), "shape"):
      # A levels pytree that is a strict prefix of params would otherwise
      # scale a whole subtree by the rate of one level array.
      raise ValueError(
          f"levels_fn returned one level array at leaf {i} where params hold a"
          f" subtree with {len(jax.tree.leaves(ref))} leaves: levels_fn must"
          " return a pytree with the structure of params (an integer array per"
          " quantized leaf, None elsewhere)."
      )
    out.append(_check_level(i, level, ref))
  return out, treedef, passed


def _measure(levels: list[Any], prev: list[Any], passed: bool = False
             ) -> tuple[list[Any], list[Any]]:
  """Per quantized leaf: changed count (int32) and size; ``None`` elsewhere.

  ``passed``: the levels came from ``levels=`` (already in memory), so they are
  counted on packed 32-bit words. Levels computed in this step from the params
  are not: XLA:CPU would recompute them from the params inside that count.
  """
  count = count_transitions_packed if passed else count_transitions
  counts, sizes = [], []
  for new, old in zip(levels, prev):
    if new is None or old is None:
      counts.append(None)
      sizes.append(None)
    else:
      counts.append(count(new, old))
      sizes.append(new.size)
  return counts, sizes


def _scale(g: jax.Array, lr: jax.Array) -> jax.Array:
  """``-lr * g`` in the dtype of ``g``.

  Low-precision updates are multiplied in float32 and rounded once: a large
  ``U`` cast to float16 first would be inf, and inf times a zero gradient NaN.
  """
  compute = jnp.promote_types(g.dtype, _RATE_DTYPE)
  return (-lr.astype(compute) * g.astype(compute)).astype(g.dtype)


def _rate_tree(treedef: Any, values: list[Any]) -> Any:
  return treedef.unflatten(values)


def _rate_leaves(treedef: Any, tree: Any) -> list[Any]:
  return treedef.flatten_up_to(tree)


def _per_leaf_or_global(granularity: str, counts: list[Any], sizes: list[Any]
                        ) -> tuple[list[Any], Optional[jax.Array]]:
  """Transition rates ``k``: a list per leaf, or one pooled scalar for ``global``."""
  if granularity == "global":
    total = sum(s for s in sizes if s is not None)
    # Each count divided by the total before summing: no int32 overflow past
    # 2^31 quantized weights, and k is exact where it matters (small counts).
    k = sum(c.astype(_RATE_DTYPE) / total for c in counts if c is not None)
    return [], jnp.asarray(k, _RATE_DTYPE)
  return [
      None if c is None else c.astype(_RATE_DTYPE) / s for c, s in zip(counts, sizes)
  ], None


# ----------------------------------------------------------------------------
# Public transformations.


def scale_by_talr(
    target_transition_rate: ScalarOrSchedule,
    levels_fn: LevelsFn,
    *,
    learning_rate: float,
    rule: str = "multiplicative",
    momentum: float = 0.99,
    rate: Optional[float] = None,
    granularity: str = "per_tensor",
    fallback_learning_rate: Optional[ScalarOrSchedule] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales updates of quantized weights by the transition-adaptive learning rate.

  At step ``n`` (0-based), for each quantized tensor (or pooled over all, with
  ``granularity="global"``):

  .. math::

    k_n &= \#\{w_d(n) \ne w_d(n-1)\} / N \\
    K_n &= m K_{n-1} + (1 - m) k_n \\
    U_n &= \max(0, U_{n-1} + \eta (R_n - K_n))
      \quad \text{(additive, paper Eq. 11)} \\
    c_n &= m c_{n-1} + (1 - m) c_{n-1} R_n / (K_n + 10^{-8}), \quad
      U_n = \text{lr} \cdot c_n \quad \text{(multiplicative, authors' code)}

  and the output is ``-U_n * updates``. ``w_d(n)`` are the levels of the params
  passed to this update, so ``k_n`` counts the transitions caused by the
  previous update; the levels of the params at ``init`` are the first previous
  levels. ``K_0 = R_0``, ``U_0 = lr``, ``c_0 = 1``.

  Non-finite values. ``k``, ``K``, ``c`` and ``U`` are computed from integer
  levels only, never from gradients, so a NaN or Inf gradient or param in one
  tensor cannot make another tensor's rates non-finite (with
  ``granularity="global"`` the shared rate stays finite too). The tensor
  itself: its update ``-U * g`` is NaN where ``g`` is; NaN weights have level
  0 under :func:`talr_optax.weight_levels` (the level of ``w = 0``), so it
  counts one burst of transitions, then none, and like any tensor that stops
  moving its ``U`` grows. ``c`` and ``U`` saturate at the largest float32
  instead of overflowing, so a zero gradient still gives a zero update. Wrap
  the optimizer in ``optax.apply_if_finite`` to skip non-finite steps: the
  state is then left exactly unchanged.

  Args:
    target_transition_rate: target ``R`` in ``[0, 1]``, a float or a schedule
      (step count -> rate), e.g. :func:`talr_optax.cosine_target`.
    levels_fn: ``params -> levels``: a pytree with the structure of params
      holding integer levels (any int dtype whose values fit int8) for every
      quantized weight and ``None`` for the other leaves. Called in ``init``
      and in every ``update`` (unless ``levels=`` is passed to ``update``).
    learning_rate: base learning rate (> 0): ``U_0``, and the scale of ``c``
      in the multiplicative rule.
    rule: ``"multiplicative"`` (default; the variant the authors' code runs)
      or ``"additive"`` (the paper's Eq. 11).
    momentum: EMA momentum ``m`` of the transition rate, in ``[0, 1)``.
    rate: additive rule only: step ``eta`` of ``U`` (> 0); ``None`` means
      ``eta = learning_rate``.
    granularity: ``"per_tensor"`` (one ``K`` and ``U`` per quantized tensor, as
      in the authors' code) or ``"global"`` (one rate pooled over all quantized
      weights).
    fallback_learning_rate: learning rate (float > 0 or schedule) for leaves
      whose level is ``None`` (full-precision params). Required if there are
      such leaves; alternatively route them to another optimizer with
      ``optax.partition``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`. Its ``update`` accepts
    ``levels=`` as an extra argument: levels already computed in the forward
    pass, used instead of calling ``levels_fn(params)``.

  References:
    Lee, Jeon, Kim, Ham, `Scheduling Weight Transitions for Quantization-Aware
    Training <https://arxiv.org/abs/2404.19248>`_, ICCV 2025.
  """
  if callable(target_transition_rate):
    _check_target_schedule(target_transition_rate)
  else:
    _check_number("target_transition_rate", target_transition_rate, 0.0, 1.0,
                  low_open=False, high_open=False)
  if not callable(levels_fn):
    raise _not_callable_levels_fn(levels_fn)
  _check_number("learning_rate", learning_rate, 0.0, np.inf, low_open=True, high_open=True)
  _check_choice("rule", rule, _RULES)
  _check_number("momentum", momentum, 0.0, 1.0, low_open=False, high_open=True)
  _check_choice("granularity", granularity, _GRANULARITIES)
  if rate is not None:
    if rule != "additive":
      raise ValueError(
          f"rate is the step of the additive rule; with rule={rule!r} it would be"
          " ignored. Pass rule='additive' or leave rate=None."
      )
    _check_number("rate", rate, 0.0, np.inf, low_open=True, high_open=True)
  if fallback_learning_rate is not None:
    _check_scalar_or_schedule("fallback_learning_rate", fallback_learning_rate,
                              low_open=True)

  target_fn = _as_schedule(target_transition_rate)
  fallback_fn = (
      None if fallback_learning_rate is None else _as_schedule(fallback_learning_rate)
  )
  eta = learning_rate if rate is None else rate

  def _scalar(value: Any) -> jax.Array:
    return jnp.asarray(value, _RATE_DTYPE)

  def init_fn(params: Any) -> ScaleByTALRState:
    levels, treedef, _ = _read_levels(levels_fn, params, {}, params)
    param_leaves = _match(treedef, params, "params")
    quantized = [lv is not None for lv in levels]
    if not any(quantized):
      raise ValueError(
          "levels_fn returned no quantized leaf (only None): scale_by_talr has"
          " nothing to adapt. Return integer levels for the quantized weights."
      )
    unquantized = [
        i for i, (lv, p) in enumerate(zip(levels, param_leaves))
        if lv is None and p is not None and not _is_masked(p)
    ]
    if unquantized and fallback_fn is None:
      raise ValueError(
          f"levels_fn returned None for {len(unquantized)} param leaves (e.g."
          f" leaf {unquantized[0]}), which scale_by_talr cannot scale by a"
          " transition rate. Pass fallback_learning_rate=... for them, or route"
          " them to another optimizer with optax.partition."
      )
    r0 = _scalar(target_fn(jnp.asarray(0, jnp.int32)))
    one = jnp.ones((), _RATE_DTYPE)

    # A separate buffer per leaf: the state can then be donated to a jitted
    # step (jax.jit(..., donate_argnums)) straight after init.
    def fill(value):
      if granularity == "global":
        return jnp.array(value, _RATE_DTYPE)
      return _rate_tree(
          treedef, [jnp.array(value, _RATE_DTYPE) if q else None for q in quantized])

    return ScaleByTALRState(
        talr_count=jnp.zeros((), jnp.int32),
        prev_levels=_rate_tree(treedef, levels),
        transition_rate=fill(jnp.zeros((), _RATE_DTYPE)),
        ema_transition_rate=fill(r0),
        target_transition_rate=fill(r0),
        talr=fill(_scalar(learning_rate) * one),
        talr_scale=fill(one),
    )

  def _adapt(k, K, U, c, R):
    K = momentum * K + (1.0 - momentum) * k
    if rule == "additive":
      U = jnp.maximum(0.0, U + eta * (R - K))
    else:
      c = momentum * c + (1.0 - momentum) * c * R / (K + _EPS)
      c = jnp.minimum(c, _RATE_MAX)
      U = jnp.minimum(learning_rate * c, _RATE_MAX)
    return K.astype(_RATE_DTYPE), U.astype(_RATE_DTYPE), c.astype(_RATE_DTYPE)

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, ScaleByTALRState):
      raise ValueError(f"state must be a ScaleByTALRState, got {type(state).__name__}.")
    levels, treedef, passed = _read_levels(levels_fn, params, extra_args, updates)
    prev = _match(treedef, state.prev_levels, "levels stored at init")
    prev = [None if p is None or _is_masked(p) else p for p in prev]
    for i, (new, old) in enumerate(zip(levels, prev)):
      if (new is None) != (old is None) or (
          new is not None and new.shape != old.shape
      ):
        raise ValueError(
            f"levels_fn changed which leaves are quantized (or their shapes)"
            f" between init and update, at leaf {i}."
        )
    count = state.talr_count
    R = _scalar(target_fn(count))
    counts, sizes = _measure(levels, prev, passed)
    k_leaves, k_global = _per_leaf_or_global(granularity, counts, sizes)

    if granularity == "global":
      K, U, c = _adapt(k_global, state.ema_transition_rate, state.talr,
                       state.talr_scale, R)
      k_out, K_out, R_out, U_out, c_out = k_global, K, R, U, c
      u_leaves = [None if lv is None else U for lv in levels]
    else:
      K_l = _rate_leaves(treedef, state.ema_transition_rate)
      U_l = _rate_leaves(treedef, state.talr)
      c_l = _rate_leaves(treedef, state.talr_scale)
      new = [
          None if k is None else _adapt(k, K_, U_, c_, R)
          for k, K_, U_, c_ in zip(k_leaves, K_l, U_l, c_l)
      ]
      u_leaves = [None if n is None else n[1] for n in new]
      k_out = _rate_tree(treedef, k_leaves)
      K_out = _rate_tree(treedef, [None if n is None else n[0] for n in new])
      R_out = _rate_tree(treedef, [None if n is None else R for n in new])
      U_out = _rate_tree(treedef, u_leaves)
      c_out = _rate_tree(treedef, [None if n is None else n[2] for n in new])

    fallback = None if fallback_fn is None else _scalar(fallback_fn(count))
    update_leaves = _match(treedef, updates, "updates")
    scaled = []
    for i, (u, lr) in enumerate(zip(update_leaves, u_leaves)):
      if u is None or _is_masked(u):
        scaled.append(u)
      elif lr is not None:
        scaled.append(jax.tree.map(lambda g, lr=lr: _scale(g, lr), u))
      elif fallback is not None:
        scaled.append(jax.tree.map(lambda g: _scale(g, fallback), u))
      else:
        raise ValueError(
            f"update leaf {i} is not quantized and no fallback_learning_rate was"
            " given: pass fallback_learning_rate=... or use optax.partition."
        )
    new_state = ScaleByTALRState(
        talr_count=optax.safe_increment(count),
        prev_levels=_rate_tree(treedef, levels),
        transition_rate=k_out,
        ema_transition_rate=K_out,
        target_transition_rate=R_out,
        talr=U_out,
        talr_scale=c_out,
    )
    return treedef.unflatten(scaled), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def track_transitions(
    levels_fn: LevelsFn,
    momentum: float = 0.99,
    *,
    initial_rate: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """Records transition rates per quantized tensor; leaves updates unchanged.

  Put it anywhere in a chain (e.g. ``optax.chain(track_transitions(fn),
  optax.sgd(0.1))``) to log ``k`` and ``K`` of a run without TALR, for a
  baseline to compare with. :func:`talr_optax.metrics` finds its fields.

  Args:
    levels_fn: as in :func:`scale_by_talr`.
    momentum: EMA momentum ``m`` of ``K``, in ``[0, 1)``.
    initial_rate: ``K_0``, in ``[0, 1]``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`TrackTransitionsState`; ``update`` accepts ``levels=`` like
    :func:`scale_by_talr`.
  """
  if not callable(levels_fn):
    raise _not_callable_levels_fn(levels_fn)
  _check_number("momentum", momentum, 0.0, 1.0, low_open=False, high_open=True)
  _check_number("initial_rate", initial_rate, 0.0, 1.0, low_open=False, high_open=False)

  def init_fn(params: Any) -> TrackTransitionsState:
    levels, treedef, _ = _read_levels(levels_fn, params, {}, params)
    if all(lv is None for lv in levels):
      raise ValueError("levels_fn returned no quantized leaf (only None): nothing to track.")
    fill = lambda v: _rate_tree(  # a buffer per leaf, so the state can be donated
        treedef, [None if lv is None else jnp.array(v, _RATE_DTYPE) for lv in levels])
    return TrackTransitionsState(
        prev_levels=_rate_tree(treedef, levels),
        transition_rate=fill(jnp.zeros((), _RATE_DTYPE)),
        ema_transition_rate=fill(jnp.asarray(initial_rate, _RATE_DTYPE)),
    )

  def update_fn(updates, state, params=None, **extra_args):
    levels, treedef, passed = _read_levels(levels_fn, params, extra_args, updates)
    prev = _match(treedef, state.prev_levels, "levels stored at init")
    counts, sizes = _measure(levels, prev, passed)
    k_leaves, _ = _per_leaf_or_global("per_tensor", counts, sizes)
    K_prev = _rate_leaves(treedef, state.ema_transition_rate)
    K_new = [
        None if k is None else (momentum * K + (1.0 - momentum) * k).astype(_RATE_DTYPE)
        for k, K in zip(k_leaves, K_prev)
    ]
    return updates, TrackTransitionsState(
        prev_levels=_rate_tree(treedef, levels),
        transition_rate=_rate_tree(treedef, k_leaves),
        ema_transition_rate=_rate_tree(treedef, K_new),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
