"""What every stage does before its own work: one prologue, one declaration of state (private).

Every transformation of the library (:func:`~talr_optax.scale_by_talr`,
:func:`~talr_optax.track_transitions`, :func:`~talr_optax.track_oscillations`,
:func:`~talr_optax.freeze_oscillations`,
:func:`~talr_optax.dampen_oscillations`) goes through a :class:`Prologue`:

* in the factory: its callables and numbers are checked, each error naming
  its argument, and schedules are wrapped and their value at step 0 checked
  (:func:`schedule`);
* in ``init``: the params must hold arrays, and for a stage that measures
  levels, they are computed (checked to fit int8) and laid out in rate
  groups (:meth:`Prologue.init`);
* in ``update``: the params are required, the state must be this stage's,
  the layout is built again from the params' shapes (static, at trace time)
  and the state is checked against it, naming the setting that changed since
  ``init`` (:meth:`Prologue.update`).

A state class declares which of its fields are per weight and which per
rate group with :func:`declare_state`. The prologue's state check,
:func:`talr_optax.metrics` and :func:`talr_optax.check_restorable` all read
that declaration, so a new state cannot be forgotten by any of them.

Centres (the latent value of a level) come from a user's ``centers_fn``:
:func:`centers_of` and :func:`check_centers_fn` check what it returns once,
for both remedies.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from talr_optax import _checks
from talr_optax import _layout
from talr_optax import _tree
from talr_optax import counting
from talr_optax._layout import Layout, LevelsFn

Schedule = Callable[[Any], Any]


# ---------------------------------------------------------------------------
# Declared state fields.


class StateFields(NamedTuple):
  """Which fields of a state class hold what.

  Attributes:
    per_weight: arrays shaped like the (counted) params at quantized leaves.
    per_rate: float32 vectors with one entry per rate group, named by the
      state's ``rate_names``; :func:`talr_optax.metrics` reports each.
    nested: fields holding another stage's state (searched for states too).
  """

  per_weight: tuple[str, ...] = ()
  per_rate: tuple[str, ...] = ()
  nested: tuple[str, ...] = ()


STATE_CLASSES: list[type] = []


def declare_state(*, per_weight: tuple[str, ...] = (), per_rate: tuple[str, ...] = (),
                  nested: tuple[str, ...] = ()) -> Callable[[type], type]:
  """Class decorator recording a state's :class:`StateFields` as ``cls.state_fields``."""

  def register(cls: type) -> type:
    unknown = [f for f in per_weight + per_rate + nested if f not in cls._fields]
    if unknown:
      raise TypeError(f"{cls.__name__} has no fields {unknown}.")
    if per_rate and "rate_names" not in cls._fields:
      raise TypeError(f"{cls.__name__} has rate vectors but no rate_names field.")
    cls.state_fields = StateFields(per_weight, per_rate, nested)
    STATE_CLASSES.append(cls)
    return cls

  return register


def is_state(x: Any) -> bool:
  """``x`` is the state of one of the library's stages."""
  return isinstance(x, tuple(STATE_CLASSES))


def find_states(tree: Any) -> list[Any]:
  """The library's states in ``tree``, in order; a nested state follows its owner."""
  found = []
  for s in jax.tree.leaves(tree, is_leaf=is_state):
    if is_state(s):
      found.append(s)
      for name in s.state_fields.nested:
        found.extend(find_states(getattr(s, name)))
  return found


def field_kinds() -> dict[str, str]:
  """``{field name: "per_weight" | "per_rate"}`` over every declared state."""
  kinds = {}
  for cls in STATE_CLASSES:
    kinds.update(dict.fromkeys(cls.state_fields.per_weight, "per_weight"))
    kinds.update(dict.fromkeys(cls.state_fields.per_rate, "per_rate"))
  return kinds


# ---------------------------------------------------------------------------
# Factory arguments.


def schedule(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False, schedule_low: Optional[float] = None,
             what: str = "", owner: Optional[str] = None) -> Schedule:
  """``value`` as a schedule ``count -> value``, checked where it is concrete.

  A number must lie in the interval; a callable is a schedule whose value at
  step 0, when concrete, must lie in ``[schedule_low, high]`` (``schedule_low``
  defaults to ``low``: e.g. a freezing threshold schedule may start at 0, off).
  A traced number (``optax.inject_hyperparams``) passes.

  Args:
    name: the argument's name, for messages.
    value: a number or a schedule.
    low, high, low_open, high_open: the accepted interval of a number.
    schedule_low: the lowest accepted value of a schedule at step 0.
    what: what the value is (e.g. ``"a rate"``), for the message.
    owner: the factory, quoted in front of the message.

  Returns:
    A callable of the step count.
  """
  if not callable(value):
    _checks.check_number(name, value, low, high, low_open=low_open, high_open=high_open,
                         owner=owner)
    return lambda count: value
  x = _checks.concrete_float(value(jnp.asarray(0, jnp.int32)))
  lowest = low if schedule_low is None else schedule_low
  if x is not None and not lowest <= x <= high:
    raise ValueError(
        f"{_checks.prefix(owner)}{name} must be {what + ' ' if what else ''}in"
        f" [{lowest:g}, {high:g}]; it is a schedule whose value at step 0 is {x!r}.")
  return value


def static_args_hint(*names: str) -> str:
  """The ``optax.inject_hyperparams`` hint for a factory's callable arguments."""
  return (f"under optax.inject_hyperparams pass static_args={tuple(names)!r}: it treats"
          " every callable argument as a schedule")


def check_levels_fn(levels_fn: Any, *, owner: str, callables: tuple[str, ...]) -> None:
  """``levels_fn`` is a callable of params (the hint names the factory's callables)."""
  _checks.check_callable("levels_fn", levels_fn,
                         f"a function params -> levels ({static_args_hint(*callables)})",
                         owner=owner)


def check_centers_fn(centers_fn: Any, *, owner: str, callables: tuple[str, ...],
                     with_levels: bool) -> None:
  """``centers_fn`` is a callable of params (and, for freezing, of levels too).

  ``with_levels``: the stage calls ``centers_fn(params, levels)``; a
  ``levels_fn`` passed by mistake (one argument) is named here, not at the
  first update.
  """
  what = ("a function (params, levels=None) -> centres" if with_levels
          else "a function params -> centres")
  _checks.check_callable("centers_fn", centers_fn,
                         f"{what} ({static_args_hint(*callables)})", owner=owner)
  if not with_levels:
    return
  try:
    inspect.signature(centers_fn).bind(None, None)
  except TypeError:
    raise ValueError(
        f"{owner}: centers_fn must accept (params, levels): it is called with the levels a"
        " weight is frozen at, and this one takes one argument. Pass the centres function"
        " of the quantizer (talr_optax.centers_fn_from_scales, talr_optax.nnx.centers_fn_for,"
        " or levels_fn.centers for Qwix), not levels_fn.") from None
  except ValueError:  # no signature (a builtin): checked at init instead
    pass


def check_inner(inner: Any, *, owner: str) -> None:
  """``inner`` is an Optax transformation (``None`` is the caller's to replace)."""
  if inner is not None and not (callable(getattr(inner, "init", None))
                                and callable(getattr(inner, "update", None))):
    raise ValueError(
        f"{owner}: inner must be an optax.GradientTransformation (the stage that applies"
        f" the learning rate), got inner of type {type(inner).__name__}.")


# ---------------------------------------------------------------------------
# init and update.


def require_arrays(params: Any, owner: str) -> None:
  """``init``'s params hold arrays (not ``optax.tree.map_params``'s placeholder)."""
  if not jax.tree.leaves(params):
    raise ValueError(
        f"{owner}.init got params without arrays: optax.tree.map_params cannot map a"
        f" {owner} state, since its init reads the real params, which a placeholder does"
        " not have. To shard the state, call tx.init (or jax.jit(tx.init)) on sharded"
        " params: per-weight state takes the sharding of its param, rates are replicated.")


def require_params(params: Any, owner: str, why: str) -> None:
  if params is None:
    raise ValueError(f"{owner} {why}, so it needs the params: call"
                     " tx.update(updates, state, params).")


def require_state(state: Any, cls: type, owner: str) -> None:
  if not isinstance(state, cls):
    raise ValueError(
        f"{owner}: state must be the {cls.__name__} of this transformation, got"
        f" {type(state).__name__}: was the state made by another optimizer?")


@dataclasses.dataclass(frozen=True)
class Prologue:
  """The shared steps of one stage, for its configuration.

  Attributes:
    owner: the factory's name, quoted in messages.
    state_class: the stage's state class (declared with :func:`declare_state`).
    levels_fn: ``params -> levels`` for a stage that measures levels, else
      ``None``.
    layer_axes: as in :func:`talr_optax.scale_by_talr`.
    sample_size: as in :func:`talr_optax.scale_by_talr`.
    global_rate: one rate pooled over all quantized leaves.
  """

  owner: str
  state_class: type
  levels_fn: Optional[LevelsFn] = None
  layer_axes: Any = None
  sample_size: Optional[int] = None
  global_rate: bool = False

  def init(self, params: Any) -> tuple[Optional[Layout], Any]:
    """``(layout, int8 levels)`` of ``init``'s params (``(None, None)`` without levels)."""
    require_arrays(params, self.owner)
    if self.levels_fn is None:
      return None, None
    return counting.init_levels(self.levels_fn, params, name=self.owner,
                                layer_axes=self.layer_axes, sample_size=self.sample_size,
                                global_rate=self.global_rate)

  def update(self, state: Any, params: Any, *, why: str, levels: Any = None
             ) -> Optional[Layout]:
    """The layout of ``params``, after checking them and ``state``.

    Args:
      state: the state ``update`` received.
      params: the params ``update`` received.
      why: why the stage needs the params (for the message when they are missing).
      levels: the levels of ``params`` if the stage computed them already
        (else only their shapes are traced).

    Returns:
      The :class:`~talr_optax._layout.Layout` (``None`` for a stage without
      levels). Raises a ``ValueError`` naming the setting when ``state`` was
      made for another configuration.
    """
    require_params(params, self.owner, why)
    require_state(state, self.state_class, self.owner)
    if self.levels_fn is None:
      return None
    if levels is None:
      levels = jax.eval_shape(self.levels_fn, params)
    layout = _layout.build(levels, params, layer_axes=self.layer_axes,
                           sample_size=self.sample_size, global_rate=self.global_rate)
    fields = self.state_class.state_fields
    _layout.check_state(layout, state.rate_names, getattr(state, fields.per_weight[0]),
                        [getattr(state, f) for f in fields.per_rate], name=self.owner,
                        sample_size=self.sample_size)
    return layout


# ---------------------------------------------------------------------------
# Centres.


def centers_of(centers_fn: Callable[..., Any], params: Any, owner: str, levels: Any = None
               ) -> tuple[Any, list[Any], list[Any]]:
  """``(treedef, param leaves, centre leaves)`` of ``centers_fn(params[, levels])``, checked.

  The centres must be a pytree with the structure of params (or a prefix of
  it holding ``None``) with, at each quantized leaf, a float array of the
  param's shape; ``None`` elsewhere.
  """
  centers = centers_fn(params) if levels is None else centers_fn(params, levels)
  leaves, treedef = jax.tree.flatten(centers, is_leaf=_tree.is_none_or_masked)
  call = "centers_fn" if levels is None else "centers_fn(params, levels)"
  try:
    param_leaves = treedef.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{owner}: {call} returned a pytree whose structure does not match the params:"
        " it must return a pytree with the structure of params, an array per quantized"
        f" leaf and None elsewhere. ({e})") from None
  paths = [p for p, _ in _tree.leaves_with_paths(
      treedef.unflatten([0] * treedef.num_leaves), is_leaf_fn=None)]
  out = []
  for path, c, p in zip(paths, leaves, param_leaves):
    if _tree.is_none_or_masked(c) or _tree.is_none_or_masked(p):
      out.append(None)
      continue
    shape, want = getattr(c, "shape", None), getattr(_tree.unbox(p), "shape", None)
    if shape is None or want is None or tuple(shape) != tuple(want):
      raise ValueError(
          f"{owner}: {call} returned {type(c).__name__} of shape {shape} at '{path}',"
          f" where the param has shape {want}: it must return one centre per weight.")
    if not jnp.issubdtype(c.dtype, jnp.floating):
      raise ValueError(
          f"{owner}: {call} returned {c.dtype} values at '{path}': centres are latent"
          " weight values (floats). Was levels_fn passed as centers_fn?")
    out.append(c)
  if all(c is None for c in out):
    raise ValueError(
        f"{owner}: {call} returned no quantized leaf (only None): there is nothing to"
        " act on. Pass the centers_fn of the quantized model.")
  return treedef, param_leaves, out
