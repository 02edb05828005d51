"""Flat scalar dicts of TALR state for loggers.

:func:`metrics` finds every :class:`ScaleByTALRState` and
:class:`TrackTransitionsState` inside an optimizer state (chains, ``masked``,
``partition``, ``inject_hyperparams``, ``MultiSteps``, ...) and returns their
per-tensor rates keyed ``"<field>/<param path>"``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from talr_optax.transform import ScaleByTALRState, TrackTransitionsState

__all__ = ["metrics"]

# Field of the state -> metric name.
_FIELDS = {
    "talr": "talr",
    "transition_rate": "transition_rate",
    "ema_transition_rate": "ema_transition_rate",
    "target_transition_rate": "target_transition_rate",
}


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(_key_name(e) for e in path)


def _is_array_wrapper(x: Any) -> bool:
  """An object that acts as an array and is a pytree node holding one array.

  Such as the ``nnx.Variable`` s (``OptArray``) that ``nnx.Optimizer`` stores
  its optimizer state in: flattening one adds its own path entry
  (``.value``), which is not part of the param path. Detected by behaviour
  (``__jax_array__`` and a single child reached through one attribute), so
  the core needs no Flax import. Plain arrays and tracers are not wrappers.
  """
  if isinstance(x, (jax.Array, np.ndarray, np.generic)) or not hasattr(x, "__jax_array__"):
    return False
  children = jax.tree_util.tree_flatten_with_path(x)[0]
  return (len(children) == 1 and len(children[0][0]) == 1
          and isinstance(children[0][0][0], jax.tree_util.GetAttrKey))


def _unwrap(x: Any) -> Any:
  return jax.tree.leaves(x)[0] if _is_array_wrapper(x) else x


def _is_talr_state(x: Any) -> bool:
  return isinstance(x, (ScaleByTALRState, TrackTransitionsState))


def metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Flat dict of TALR scalars found anywhere in ``opt_state``.

  Args:
    opt_state: any optimizer state that contains states of
      :func:`talr_optax.scale_by_talr` or :func:`talr_optax.track_transitions`.

  Returns:
    ``{"talr/<param path>": U, "transition_rate/<path>": k,
    "ema_transition_rate/<path>": K, "target_transition_rate/<path>": R}``
    with float32 scalar arrays (jit-compatible: no host transfer). With
    ``granularity="global"`` the key is the field name alone. When several
    TALR states hold the same param path, later ones get a ``#<i>`` suffix.
    Values held in array wrappers (the ``nnx.Variable`` s of
    ``nnx.Optimizer(...).opt_state``) are unwrapped: the keys are the param
    paths (``"talr/fc2/kernel"``) and the values plain arrays.
  """
  found = [
      s for s in jax.tree.leaves(opt_state, is_leaf=_is_talr_state) if _is_talr_state(s)
  ]
  out: dict[str, jax.Array] = {}
  for i, state in enumerate(found):
    for field, name in _FIELDS.items():
      if not hasattr(state, field):
        continue
      leaves = jax.tree_util.tree_flatten_with_path(
          getattr(state, field), is_leaf=_is_array_wrapper)[0]
      for path, value in leaves:
        value = _unwrap(value)
        suffix = _path_str(path)
        key = f"{name}/{suffix}" if suffix else name
        if key in out:
          key = f"{key}#{i}"
        out[key] = value
  return out
