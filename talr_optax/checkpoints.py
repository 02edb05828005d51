"""Restoring a TALR state into another configuration: say which setting differs.

A checkpoint restores into a freshly initialised state (``like``). When the
optimizer was built with another ``sample_size``, ``layer_axes`` or
``granularity``, or the model has another number of stacked layers, some
arrays of the state have other shapes. Orbax then reports a shape mismatch
and suggests truncating or padding, which would silently corrupt the run.
:func:`check_restorable` compares the shapes first and names the setting.
It reads shapes only, from arrays or from any objects with a ``shape``
(Orbax's ``manager.item_metadata(step)``), and imports no checkpoint library.
"""

from __future__ import annotations

from typing import Any


from talr_optax import _tree

__all__ = ["check_restorable"]

# Fields of the TALR states: per weight (shaped like the counted levels) and
# one entry per rate group.
_PER_WEIGHT = ("prev_levels", "last_direction", "oscillation_frequency")
_PER_RATE = ("transition_rate", "ema_transition_rate", "target_transition_rate", "talr",
             "talr_scale", "mean_oscillation_frequency", "oscillating_fraction",
             "oscillation_rate")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  has_shape = lambda x: hasattr(_tree.unbox(x), "shape")
  return {path: tuple(_tree.unbox(x).shape)
          for path, x in _tree.leaves_with_paths(tree, has_shape) if has_shape(x)}


def check_restorable(saved: Any, like: Any) -> None:
  """Raises a ``ValueError`` naming the setting when ``saved`` does not fit ``like``.

  Args:
    saved: the saved state, or its metadata (leaves with a ``shape``, e.g.
      ``manager.item_metadata(step)["state"]`` of an Orbax
      ``CheckpointManager``).
    like: the state to restore into, built by this run (its params and
      ``tx.init(params)``).

  Raises:
    ValueError: when an array of ``like`` has another shape in ``saved``. The
      message names the setting: the params (e.g. the number of stacked
      layers), ``sample_size`` (the stored levels), or ``layer_axes`` /
      ``granularity`` (the rate vectors).
  """
  old, new = _shapes(saved), _shapes(like)
  differ = {path: (old[path], shape) for path, shape in new.items()
            if path in old and old[path] != shape}
  if not differ:
    return
  field = lambda path: next((f for f in _PER_WEIGHT + _PER_RATE
                             if f"/{f}/" in f"/{path}/"), None)
  weights = [p for p in differ if field(p) in _PER_WEIGHT]
  rates = [p for p in differ if field(p) in _PER_RATE]
  others = [p for p in differ if field(p) is None]
  if others:
    cause = ("the params (or another optimizer's state) have other shapes: the model"
             " differs, e.g. in its number of stacked layers")
  elif weights:
    cause = ("the stored levels have other shapes while the params do not: sample_size"
             " differs (it sets which weights are counted and stored)")
  else:
    cause = ("the rate vectors have another length while the params and levels do not:"
             " layer_axes or granularity differs (they set the number of rates)")
  first = (others or weights or rates)[0]
  raise ValueError(
      f"the checkpoint does not fit this run: {cause}. First difference: '{first}'"
      f" saved {differ[first][0]}, here {differ[first][1]}"
      f" ({len(differ)} arrays differ). Build the model and optimizer as the saved run"
      " did; restoring with truncation or padding would corrupt the state.")
