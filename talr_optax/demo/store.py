"""The run store behind ``--checkpoint-dir``: resumable demo runs on disk.

Layout of the directory::

  config.json                          settings that change what a run computes
  .lock                                held by the demo process using the directory
  seed{s}_full_precision/{epochs}/     the pretrained model of seed s (Orbax)
  seed{s}_w{b}_{method}/epochs/{e}/    a QAT run after epoch e, newest two (Orbax)
  seed{s}_w{b}_{method}/record.json    a finished run's record

Checkpoints are written by Orbax's ``CheckpointManager``; :class:`Checkpoints`
adds only the three checks it lacks (see there). The rest is the demo's,
not a checkpoint's: ``config.json``, the lock and the finished records.
Orbax is imported only when a :class:`Checkpoints` is created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from talr_optax import _tree
from talr_optax.demo.config import DemoConfig

try:  # Advisory file locks; without them (Windows) the directory is not locked.
  import fcntl
except ImportError:  # pragma: no cover
  fcntl = None

# Settings that do not change what a run computes: they may differ on resume.
_FREE = ("out", "checkpoint_dir", "seeds", "bits")


class CorruptCheckpointError(ValueError):
  """A checkpoint on disk cannot be read back as it was written."""


# Mode of the JSON files written: readable by everyone, as the figures are
# (mkstemp alone would leave them readable by their owner only).
JSON_MODE = 0o644


def write_json_atomic(path: Path, obj: Any) -> None:
  """Writes via a temporary file: a failed run never leaves a half-written file.

  The file gets mode :data:`JSON_MODE`.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f)
    os.chmod(tmp, JSON_MODE)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_json(path: Path) -> Any:
  """The JSON in ``path``; a ``ValueError`` naming the file if it is not JSON."""
  try:
    return json.loads(path.read_text())
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(
        f"{path} is corrupt (not JSON: {e}); delete it, or use another --checkpoint-dir"
    ) from e


def _fixed_config(cfg: DemoConfig) -> dict[str, Any]:
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _FREE}


def check_config(cfg: DemoConfig) -> None:
  """Refuses a ``--checkpoint-dir`` written with other settings, or unreadable.

  Raises:
    ValueError: naming the directory, or ``config.json`` if it is corrupt,
      and the settings that differ.
  """
  root = Path(cfg.checkpoint_dir)
  if root.exists() and not root.is_dir():
    raise ValueError(f"--checkpoint-dir must be a directory, but {root} is a file")
  path = root / "config.json"
  if not path.exists():
    return
  stored = read_json(path)
  if not isinstance(stored, dict):
    raise ValueError(f"{path} is corrupt (not a JSON object); delete it, or use another "
                     "--checkpoint-dir")
  fixed = _fixed_config(cfg)
  diff = [f"{k} {stored.get(k)!r} there, {fixed.get(k)!r} here"
          for k in sorted(set(stored) | set(fixed))
          if k not in _FREE and stored.get(k) != fixed.get(k)]
  if diff:
    raise ValueError(
        f"--checkpoint-dir {root} holds runs of another configuration ({'; '.join(diff)}); "
        "use another directory or the same settings")


class _Lock:
  """An exclusive lock on ``root/.lock``, freed when the process ends."""

  def __init__(self, root: Path):
    self._fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:  # pragma: no cover
      return
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      pid = os.read(self._fd, 32).decode(errors="replace").strip() or "unknown"
      os.close(self._fd)
      raise ValueError(
          f"--checkpoint-dir {root} is in use by another demo run (process {pid}); "
          "wait for it to end, or use another directory") from None
    os.ftruncate(self._fd, 0)
    os.write(self._fd, str(os.getpid()).encode())

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # also frees the lock
      self._fd = None


def _orbax() -> Any:
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("--checkpoint-dir needs orbax-checkpoint: pip install orbax-checkpoint"
                      ) from e
  return ocp


def _signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """Shape and dtype of every array leaf, by path (``None`` leaves have none)."""
  return {path: (tuple(getattr(x, "shape", ())), str(np.dtype(getattr(x, "dtype", type(x)))))
          for path, x in _tree.leaves_with_paths(getattr(tree, "tree", tree), None)}


def _sha256(tree: Any) -> str:
  """A digest of every array's path, shape, dtype and bytes."""
  h = hashlib.sha256()
  for path, x in sorted(_tree.leaves_with_paths(jax.device_get(tree), None)):
    x = np.ascontiguousarray(x)
    h.update(f"{path}|{x.shape}|{x.dtype}|".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def _short(names: list[str]) -> str:
  return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _check_structure(where: Path, saved: Any, like: Any) -> None:
  """Raises unless the checkpoint has exactly the arrays of ``like``."""
  have, want = _signature(saved), _signature(like)
  problems = []
  if only_saved := sorted(set(have) - set(want)):
    problems.append(f"only in the checkpoint: {_short(only_saved)}")
  if only_here := sorted(set(want) - set(have)):
    problems.append(f"only in this run: {_short(only_here)}")
  if changed := sorted(p for p in set(have) & set(want) if have[p] != want[p]):
    problems.append("other shape or dtype: " + _short(
        [f"{p} (saved {have[p]}, here {want[p]})" for p in changed]))
  if problems:
    raise ValueError(f"checkpoint {where} does not fit this run (written by another model "
                     f"or optimizer?): {'; '.join(problems)}")


class Checkpoints:
  """Numbered checkpoints of one run: Orbax's ``CheckpointManager`` plus three checks.

  Orbax alone skips or replaces, without a word, a step that another manager
  of the same directory has just written; restores into a target that has
  ``None`` where the checkpoint has an array by dropping that array (and
  casts other dtypes to the target's); and reports a damaged file by
  whatever error its reader raises, or not at all (its checksums cover the
  chunk index, not the data). Here a step on disk is never written again,
  the checkpoint must hold exactly the arrays (paths, shapes, dtypes) of the
  target, and an unreadable or altered checkpoint (a SHA-256 of the arrays
  is saved with them) is a :class:`CorruptCheckpointError` naming it.

  Args:
    directory: one sub-directory per step is written here (created if missing).
    max_to_keep: keep the newest ``max_to_keep`` steps (None: all).
  """

  def __init__(self, directory: str | os.PathLike[str], max_to_keep: int | None = None):
    ocp = self._ocp = _orbax()
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest complete step on disk (re-read: another writer may have added one)."""
    self._manager.reload()
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes ``state`` (arrays) and ``meta`` (JSON) as ``step``, and waits for it.

    Raises:
      FileExistsError: ``step`` is on disk already; nothing is changed.
    """
    self._manager.reload()
    if step in self._manager.all_steps():
      raise FileExistsError(f"checkpoint {self.directory / str(step)} exists already (written "
                            "by another process?); not writing over it")
    ocp = self._ocp
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"sha256": _sha256(state), "meta": meta})))
    self._manager.wait_until_finished()

  def restore(self, like: Any) -> tuple[int, Any, dict[str, Any]]:
    """The newest step as ``(step, state, meta)``, ``state`` in the structure of ``like``.

    Raises:
      FileNotFoundError: no checkpoint in the directory.
      ValueError: the checkpoint's arrays are not those of ``like``.
      CorruptCheckpointError: a file of the checkpoint is damaged.
    """
    step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    where = self.directory / str(step)
    ocp = self._ocp
    with _reported_as_corrupt(where):
      saved = self._manager.item_metadata(step)["state"]
      if saved is None:
        raise FileNotFoundError("no metadata of its arrays")
    _check_structure(where, saved, like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with _reported_as_corrupt(where):
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      digest, meta = out.meta["sha256"], out.meta["meta"]
    if _sha256(out.state) != digest:
      raise CorruptCheckpointError(
          f"checkpoint {where} is corrupt: its arrays differ from the checksum saved with "
          f"them; delete {where} to resume from the step before it")
    return step, out.state, meta

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return lines[0][:200] if lines else ""


@contextlib.contextmanager
def _reported_as_corrupt(where: Path) -> Iterator[None]:
  """Turns any error of reading a checkpoint into a :class:`CorruptCheckpointError`."""
  try:
    yield
  # Orbax and TensorStore raise many types (even bare Exception) for a truncated
  # or altered file; the structure is checked apart, so this means damage.
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(
        f"checkpoint {where} is corrupt or incomplete ({type(e).__name__}: {_first_line(e)}); "
        f"delete {where} to resume from the step before it") from e


class RunStore:
  """Every run of one demo configuration under ``cfg.checkpoint_dir``.

  Opening it checks ``config.json`` against ``cfg`` (see :func:`check_config`)
  and locks the directory: a second demo on the same directory fails at once
  instead of writing over this one's checkpoints. Use it as a context manager.
  """

  def __init__(self, cfg: DemoConfig):
    check_config(cfg)
    self.root = Path(cfg.checkpoint_dir)
    self.root.mkdir(parents=True, exist_ok=True)
    self._lock = _Lock(self.root)
    if not (self.root / "config.json").exists():
      write_json_atomic(self.root / "config.json", _fixed_config(cfg))

  def close(self) -> None:
    self._lock.release()

  def __enter__(self) -> "RunStore":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def _dir(self, bits: int, seed: int, method: str) -> Path:
    return self.root / f"seed{seed}_w{bits}_{method}"

  def finished(self, bits: int, seed: int, method: str) -> dict[str, Any] | None:
    """The record of a finished run, or None."""
    path = self._dir(bits, seed, method) / "record.json"
    return read_json(path) if path.exists() else None

  def save_finished(self, bits: int, seed: int, method: str, record: dict[str, Any]) -> None:
    write_json_atomic(self._dir(bits, seed, method) / "record.json", record)

  def run_checkpoints(self, bits: int, seed: int, method: str) -> Checkpoints:
    """Checkpoints of a QAT run after each epoch (the newest two are kept)."""
    return Checkpoints(self._dir(bits, seed, method) / "epochs", max_to_keep=2)

  def full_precision_checkpoints(self, seed: int) -> Checkpoints:
    """The pretrained full-precision model of ``seed`` (QAT of every bit width starts there)."""
    return Checkpoints(self.root / f"seed{seed}_full_precision")
