"""Bytes of the Python standard library's source: a corpus every machine has.

:func:`load_stdlib` reads the top-level ``*.py`` files of
``sysconfig.get_paths()["stdlib"]`` in name order and holds out every
``val_every``-th file (the 10th, 20th, ...) for validation, so both splits
span the alphabet and no file is in both. The facts that make a result
reproducible (Python version, file and byte counts, a SHA-256 of each split)
travel with the data into ``results.json``; the same Python gives the same
bytes.

:func:`random_windows` draws training batches of random contiguous windows;
:func:`fixed_windows` gives the validation windows, the same every call.
NumPy only.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
import typing as tp

import numpy as np

from talr_optax import _checks

__all__ = ["ByteCorpus", "stdlib_files", "load_stdlib", "split_files", "random_windows",
           "fixed_windows"]


class ByteCorpus(tp.NamedTuple):
  """Training and validation bytes (uint8) and the facts that identify them."""

  train: np.ndarray
  val: np.ndarray
  facts: dict[str, tp.Any]


def stdlib_files(directory: str | os.PathLike[str] | None = None) -> list[str]:
  """The top-level ``*.py`` files of ``directory``, sorted by name.

  Args:
    directory: default ``sysconfig.get_paths()["stdlib"]`` (this Python's
      standard library; the same inside a virtual environment).

  Returns:
    Full paths, sorted by file name (byte order, not locale order).

  Raises:
    FileNotFoundError: ``directory`` holds no ``*.py`` file.
  """
  directory = os.fspath(directory or sysconfig.get_paths()["stdlib"])
  names = sorted(n for n in os.listdir(directory)
                 if n.endswith(".py") and os.path.isfile(os.path.join(directory, n)))
  if not names:
    raise FileNotFoundError(f"no *.py file in {directory}: not a Python standard library?")
  return [os.path.join(directory, n) for n in names]


def split_files(files: tp.Sequence[str], val_every: int) -> tuple[list[str], list[str]]:
  """``(train, val)``: every ``val_every``-th file (1-based) goes to validation.

  Args:
    files: paths in a fixed order.
    val_every: an int >= 2; 10 holds out files 10, 20, 30, ...

  Returns:
    Two lists in the order of ``files``.
  """
  val_every = _checks.check_int("val_every", val_every, 2)
  val = [f for i, f in enumerate(files) if (i + 1) % val_every == 0]
  train = [f for i, f in enumerate(files) if (i + 1) % val_every != 0]
  return train, val


def _read(files: tp.Sequence[str]) -> bytes:
  parts = []
  for path in files:
    with open(path, "rb") as f:
      parts.append(f.read())
  return b"".join(parts)


def load_stdlib(*, val_every: int = 10, min_bytes: int = 1,
                directory: str | os.PathLike[str] | None = None) -> ByteCorpus:
  """The standard library's source as train and validation bytes.

  Files are concatenated as they are, in name order, within each split.

  Args:
    val_every: every ``val_every``-th file is held out (an int >= 2).
    min_bytes: each split must hold at least this many bytes (an int >= 1),
      e.g. one window of the model's context plus one.
    directory: see :func:`stdlib_files`.

  Returns:
    A :class:`ByteCorpus`; ``facts`` holds ``python``, ``implementation``,
    ``files``, ``train_files``, ``val_files``, ``train_bytes``,
    ``val_bytes``, ``train_sha256``, ``val_sha256`` and ``val_every``.

  Raises:
    FileNotFoundError: no ``*.py`` file in the directory.
    ValueError: a split is shorter than ``min_bytes``.
  """
  min_bytes = _checks.check_int("min_bytes", min_bytes, 1)
  files = stdlib_files(directory)
  train_files, val_files = split_files(files, val_every)
  train, val = _read(train_files), _read(val_files)
  for name, data in (("training", train), ("validation", val)):
    if len(data) < min_bytes:
      raise ValueError(
          f"the {name} split of {os.path.dirname(files[0])} holds {len(data)} bytes, fewer "
          f"than the {min_bytes} one window needs")
  facts = {
      "source": "top-level *.py files of sysconfig.get_paths()['stdlib'], sorted by name",
      "python": platform.python_version(),
      "implementation": platform.python_implementation(),
      "val_every": int(val_every),
      "files": len(files),
      "train_files": len(train_files),
      "val_files": len(val_files),
      "train_bytes": len(train),
      "val_bytes": len(val),
      "train_sha256": hashlib.sha256(train).hexdigest(),
      "val_sha256": hashlib.sha256(val).hexdigest(),
  }
  as_array = lambda b: np.frombuffer(b, dtype=np.uint8)
  return ByteCorpus(as_array(train), as_array(val), facts)


def random_windows(data: np.ndarray, length: int, batch_size: int,
                   rng: np.random.Generator) -> np.ndarray:
  """Random contiguous windows: a training batch.

  Args:
    data: uint8 bytes, at least ``length`` of them.
    length: window length (the model's context plus one).
    batch_size: number of windows.
    rng: draws the start of each window, uniformly over ``data``.

  Returns:
    ``(batch_size, length)`` int32 byte ids.
  """
  starts = rng.integers(0, len(data) - length + 1, size=batch_size)
  return data[starts[:, None] + np.arange(length)].astype(np.int32)


def fixed_windows(data: np.ndarray, length: int, count: int) -> np.ndarray:
  """Windows at evenly spaced starts: the same ``data`` always gives the same ones.

  Args:
    data: uint8 bytes, at least ``length`` of them.
    length: window length.
    count: number of windows (they overlap if ``data`` is short).

  Returns:
    ``(count, length)`` int32 byte ids, the first one at the start of
    ``data`` and the last one at its end.
  """
  starts = np.linspace(0, len(data) - length, num=count).astype(np.int64)
  return data[starts[:, None] + np.arange(length)].astype(np.int32)
