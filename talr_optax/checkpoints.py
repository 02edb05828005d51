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


from talr_optax import _stage
from talr_optax import _tree

__all__ = ["check_restorable"]


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  has_shape = lambda x: hasattr(_tree.unbox(x), "shape")
  return {path: tuple(_tree.unbox(x).shape)
          for path, x in _tree.leaves_with_paths(tree, has_shape) if has_shape(x)}


def _field_kind(path: str, kinds: dict[str, str]) -> str:
  """``"per_weight"``, ``"per_rate"`` or ``"other"``: the declared field ``path`` lies in."""
  # The field name comes before the param path below it (whose names are the user's).
  return next((kinds[part] for part in path.split("/") if part in kinds), "other")


def check_restorable(saved: Any, like: Any) -> None:
  """Raises a ``ValueError`` naming the setting when ``saved`` does not fit ``like``.

  Args:
    saved: the saved state, or its metadata (leaves with a ``shape``, e.g.
      ``manager.item_metadata(step)["state"]`` of an Orbax
      ``CheckpointManager``).
    like: the state to restore into, built by this run (its params and
      ``tx.init(params)``).

  Raises:
    ValueError: when ``saved`` or ``like`` holds no arrays, when they have no
      array path in common (``saved`` is another tree), or when an array of
      ``like`` has another shape in ``saved``. The message names the setting:
      the params (e.g. the number of stacked layers), ``sample_size`` (the
      stored per-weight state), or ``layer_axes`` / ``granularity`` (the rate
      vectors). Which field is which is read from each state class's
      declaration, so every stage of the library is covered.
  """
  old, new = _shapes(saved), _shapes(like)
  for name, shapes, value in (("saved", old, saved), ("like", new, like)):
    if not shapes:
      raise ValueError(
          f"check_restorable: {name} holds no arrays (got {type(value).__name__}): pass"
          " the saved state (or its metadata) and the state to restore into.")
  if not old.keys() & new.keys():
    raise ValueError(
        "check_restorable: saved and like have no array path in common (e.g. saved"
        f" '{next(iter(old))}', like '{next(iter(new))}'): they are not the same tree."
        " Pass the same item of the checkpoint as the state you restore into.")
  differ = {path: (old[path], shape) for path, shape in new.items()
            if path in old and old[path] != shape}
  if not differ:
    return
  kinds = _stage.field_kinds()
  by_kind: dict[str, list[str]] = {"other": [], "per_weight": [], "per_rate": []}
  for path in differ:
    by_kind[_field_kind(path, kinds)].append(path)
  if by_kind["other"]:
    cause = ("the params (or another optimizer's state) have other shapes: the model"
             " differs, e.g. in its number of stacked layers")
  elif by_kind["per_weight"]:
    cause = ("the stored per-weight state (levels, directions, frequencies) has other"
             " shapes while the params do not: sample_size differs (it sets which weights"
             " are counted and stored)")
  else:
    cause = ("the rate vectors have another length while the params and per-weight state"
             " do not: layer_axes or granularity differs (they set the number of rates)")
  first = (by_kind["other"] or by_kind["per_weight"] or by_kind["per_rate"])[0]
  raise ValueError(
      f"the checkpoint does not fit this run: {cause}. First difference: '{first}'"
      f" saved {differ[first][0]}, here {differ[first][1]}"
      f" ({len(differ)} arrays differ). Build the model and optimizer as the saved run"
      " did; restoring with truncation or padding would corrupt the state.")
