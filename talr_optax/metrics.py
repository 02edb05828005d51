"""Flat scalar dicts of TALR state for loggers.

:func:`metrics` finds the state of every stage of the library inside an
optimizer state (chains, ``masked``, ``partition``, ``inject_hyperparams``,
``MultiSteps``, the inner stage of a freezing stage, ``nnx.Optimizer``, ...)
and returns one scalar per rate group and per-rate field, keyed
``"<field>/<name>"``. Which fields are per rate group is what each state
class declares (``talr_optax._stage.declare_state``), so a new stage's
fields are reported without a list to update here.
"""

from __future__ import annotations

from typing import Any

import jax

from talr_optax import _stage
from talr_optax import _tree

__all__ = ["metrics"]


def metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Flat dict of TALR scalars found anywhere in ``opt_state``.

  Args:
    opt_state: any optimizer state holding states of
      :func:`talr_optax.scale_by_talr`, :func:`talr_optax.track_transitions`,
      :func:`talr_optax.track_oscillations` or
      :func:`talr_optax.freeze_oscillations` (also the ``opt_state`` of an
      ``nnx.Optimizer``, whose boxed arrays are unboxed).

  Returns:
    One float32 scalar array per rate group and per-rate field of each state
    (jit-compatible: no host transfer), keyed ``"<field>/<name>"``: for TALR
    ``"talr/<name>"`` (``U``), ``"talr_scale/<name>"`` (``c = U / lr``),
    ``"transition_rate/<name>"`` (``k``), ``"ema_transition_rate/<name>"``
    (``K``), ``"target_transition_rate/<name>"`` (``R``) and
    ``"initial_target_rate/<name>"`` (``R_0``). ``<name>`` is the param path
    (``"conv1/kernel"``), with ``[i]`` for layer ``i`` of a stacked param;
    with ``granularity="global"`` the key is the field name alone. The
    oscillation monitor adds ``mean_oscillation_frequency/<name>``,
    ``oscillating_fraction/<name>`` and ``oscillation_rate/<name>``;
    :func:`talr_optax.freeze_oscillations` adds ``frozen_fraction/<name>``
    (and the states of its ``inner`` stage are found). When several states
    hold the same key, the second gets ``#1``, the third ``#2``, and so on
    (in the order of the states).
  """
  out: dict[str, jax.Array] = {}
  seen: dict[str, int] = {}
  for state in _stage.find_states(opt_state):
    names = state.rate_names.names if state.state_fields.per_rate else ()
    for field in state.state_fields.per_rate:
      vector = _tree.unbox(getattr(state, field))
      for j, name in enumerate(names):
        key = f"{field}/{name}" if name else field
        repeat = seen.get(key, 0)
        seen[key] = repeat + 1
        out[f"{key}#{repeat}" if repeat else key] = vector[j]
  return out
