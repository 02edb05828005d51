"""Flat scalar dicts of TALR state for loggers.

:func:`metrics` finds every state of :func:`talr_optax.scale_by_talr` and
:func:`talr_optax.track_transitions` (and of the oscillation monitor and
freezing stage) inside an optimizer state (chains, ``masked``, ``partition``,
``inject_hyperparams``, ``MultiSteps``, the inner stage of a freezing stage,
``nnx.Optimizer``, ...) and returns one scalar per rate group and field, keyed
``"<field>/<name>"``.
"""

from __future__ import annotations

from typing import Any

import jax

from talr_optax import _tree
from talr_optax.freezing import FreezeOscillationsState
from talr_optax.oscillations import TrackOscillationsState
from talr_optax.transform import ScaleByTALRState, TrackTransitionsState

__all__ = ["metrics"]

_FIELDS = ("talr", "transition_rate", "ema_transition_rate", "target_transition_rate",
           "mean_oscillation_frequency", "oscillating_fraction", "oscillation_rate",
           "frozen_fraction")
_STATES = (ScaleByTALRState, TrackTransitionsState, TrackOscillationsState,
           FreezeOscillationsState)


def _is_state(x: Any) -> bool:
  return isinstance(x, _STATES)


def _find_states(tree: Any) -> list[Any]:
  """The states in ``tree``, in order; a freezing stage's inner state follows it."""
  found = []
  for s in jax.tree.leaves(tree, is_leaf=_is_state):
    if _is_state(s):
      found.append(s)
      if isinstance(s, FreezeOscillationsState):
        found.extend(_find_states(s.inner_state))
  return found


def metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Flat dict of TALR scalars found anywhere in ``opt_state``.

  Args:
    opt_state: any optimizer state holding states of
      :func:`talr_optax.scale_by_talr`, :func:`talr_optax.track_transitions`
      or :func:`talr_optax.track_oscillations` (also the ``opt_state`` of an
      ``nnx.Optimizer``, whose boxed arrays are unboxed).

  Returns:
    ``{"talr/<name>": U, "transition_rate/<name>": k,
    "ema_transition_rate/<name>": K, "target_transition_rate/<name>": R}``
    with float32 scalar arrays (jit-compatible: no host transfer). ``<name>``
    is the param path (``"conv1/kernel"``), with ``[i]`` for layer ``i`` of a
    stacked param; with ``granularity="global"`` the key is the field name
    alone. The oscillation monitor adds ``mean_oscillation_frequency/<name>``,
    ``oscillating_fraction/<name>`` and ``oscillation_rate/<name>``;
    :func:`talr_optax.freeze_oscillations` adds ``frozen_fraction/<name>``
    (and the states of its ``inner`` stage are found). When
    several states hold the same key, the second gets ``#1``, the third
    ``#2``, and so on (in the order of the states).
  """
  found = _find_states(opt_state)
  out: dict[str, jax.Array] = {}
  seen: dict[str, int] = {}
  for state in found:
    names = state.rate_names.names
    for field in _FIELDS:
      if not hasattr(state, field):
        continue
      vector = _tree.unbox(getattr(state, field))
      for j, name in enumerate(names):
        key = f"{field}/{name}" if name else field
        repeat = seen.get(key, 0)
        seen[key] = repeat + 1
        out[f"{key}#{repeat}" if repeat else key] = vector[j]
  return out
