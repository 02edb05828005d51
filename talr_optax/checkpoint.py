"""Save and resume a training run (params + optimizer state) with Orbax.

TALR's state is ordinary arrays (int8 levels, float32 rates, an int32 count),
so a checkpoint of ``params`` and ``opt_state`` resumes a run bit for bit: the
next update compares the restored levels with those of the restored params,
exactly as the uninterrupted run would.

Optional: needs ``orbax-checkpoint`` (``pip install "talr_optax[checkpoint]"``).
Nothing else in ``talr_optax`` imports this module, and it imports Orbax only
when a :class:`Checkpointer` is created.

Example::

  ckpt = Checkpointer(directory)
  state = {"params": params, "opt_state": tx.init(params)}
  start = 0
  if ckpt.latest_step() is not None:
    start, state, meta = ckpt.restore(state)   # state: the templates
  for step in range(start, total_steps):
    state = train_step(state, batch(step))
    if (step + 1) % every == 0:
      ckpt.save(step + 1, state, meta={"epoch": ...})
  ckpt.close()

Steps already on disk are never overwritten (``save`` raises instead), and
Orbax writes each checkpoint to a temporary directory renamed when complete,
so a run that fails mid-save leaves the earlier checkpoints intact.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax

__all__ = ["Checkpointer"]


def _orbax() -> Any:
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "talr_optax.checkpoint needs orbax-checkpoint: pip install"
        ' "talr_optax[checkpoint]" (or pip install orbax-checkpoint).'
    ) from e
  return ocp


def _abstract(tree: Any) -> Any:
  """Shape, dtype and sharding of every array: the restore target."""

  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x

  return jax.tree.map(leaf, tree)


class Checkpointer:
  """Numbered checkpoints of a pytree (e.g. ``{"params", "opt_state"}``) in a directory.

  Args:
    directory: where the checkpoints go (created if missing); one
      sub-directory per step.
    max_to_keep: keep only the newest ``max_to_keep`` checkpoints (None: all).
  """

  def __init__(self, directory: str | os.PathLike[str], *,
               max_to_keep: Optional[int] = None):
    if not isinstance(directory, (str, os.PathLike)) or not str(directory):
      raise ValueError(f"directory must be a path, got directory = {directory!r}.")
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
        or max_to_keep < 1):
      raise ValueError(
          f"max_to_keep must be None or an integer >= 1, got max_to_keep = {max_to_keep!r}."
      )
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f"directory {path!r} exists and is not a directory.")
    self._ocp = _orbax()
    self.directory = path
    self._manager = self._ocp.CheckpointManager(
        path,
        options=self._ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, meta: Optional[dict[str, Any]] = None,
           wait: bool = True) -> None:
    """Writes ``state`` (and JSON-serialisable ``meta``) as checkpoint ``step``.

    Args:
      step: integer >= 0, e.g. the number of updates done.
      state: any pytree of arrays (``None`` / empty nodes allowed).
      meta: optional small dict of Python values (data position, seeds...).
      wait: block until the checkpoint is on disk (default). With False the
        write finishes in the background; call :meth:`wait` or :meth:`close`.

    Raises:
      FileExistsError: a checkpoint for ``step`` (or a later one) exists;
        nothing on disk is changed.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise ValueError(f"step must be an integer >= 0, got step = {step!r}.")
    if meta is not None and not isinstance(meta, dict):
      raise ValueError(f"meta must be a dict or None, got meta = {meta!r}.")
    latest = self._manager.latest_step()
    if latest is not None and step <= latest:
      raise FileExistsError(
          f"a checkpoint for step {latest} already exists in {self.directory};"
          f" refusing to write step {step} over or before it. Resume from it"
          " (restore) or use another directory."
      )
    ocp = self._ocp
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta or {})),
    )
    if not self._manager.save(step, args=args):
      raise RuntimeError(f"orbax did not save step {step} in {self.directory}.")
    if wait:
      self._manager.wait_until_finished()

  def restore(self, like: Any, step: Optional[int] = None
              ) -> tuple[int, Any, dict[str, Any]]:
    """Reads a checkpoint into the structure, dtypes and shardings of ``like``.

    Args:
      like: a pytree shaped like the saved state, e.g. ``{"params": params,
        "opt_state": tx.init(params)}`` of a fresh run, or its
        ``jax.eval_shape``. Arrays are restored with the sharding of the
        corresponding leaf of ``like`` when it has one, and cast to its dtype
        (Orbax's rule) if that differs from the saved one.
      step: the step to read (default: the latest).

    Returns:
      ``(step, state, meta)``.

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in the directory.
      ValueError: the checkpoint does not have the structure of ``like``.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}.")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(
          f"no checkpoint for step {step!r} in {self.directory}; steps on disk: {steps}."
      )
    ocp = self._ocp
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(like)),
        meta=ocp.args.JsonRestore(),
    )
    try:
      out = self._manager.restore(step, args=args)
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(
          f"the checkpoint for step {step} in {self.directory} does not match"
          " the structure of `like` (was it written with another model or"
          f" optimizer?): {e}"
      ) from e
    restored = out.state
    return step, restored, dict(out.meta or {})

  def wait(self) -> None:
    """Blocks until background writes are done."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

