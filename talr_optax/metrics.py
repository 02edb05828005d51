"""Flat scalar dicts of TALR state for loggers.

:func:`metrics` finds every state of :func:`talr_optax.scale_by_talr` and
:func:`talr_optax.track_transitions` inside an optimizer state (chains,
``masked``, ``partition``, ``inject_hyperparams``, ``MultiSteps``,
``nnx.Optimizer``, ...) and returns one scalar per rate group and field, keyed
``"<field>/<name>"``.
"""

from __future__ import annotations

from typing import Any

import jax

from talr_optax import _tree
from talr_optax.oscillations import TrackOscillationsState
from talr_optax.transform import ScaleByTALRState, TrackTransitionsState

__all__ = ["metrics"]

_FIELDS = ("talr", "transition_rate", "ema_transition_rate", "target_transition_rate",
           "mean_oscillation_frequency", "oscillating_fraction", "oscillation_rate")
_STATES = (ScaleByTALRState, TrackTransitionsState, TrackOscillationsState)


def _is_state(x: Any) -> bool:
  return isinstance(x, _STATES)


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
    ``oscillating_fraction/<name>`` and ``oscillation_rate/<name>``. When
    several states hold the same key, the second gets ``#1``, the third
    ``#2``, and so on (in the order of the states).
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(s)]
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
