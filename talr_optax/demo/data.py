"""Small image data sets for the demo, tests and benchmarks; NumPy only, no download.

* :func:`load_digits`: the 1,797 8x8 handwritten digits that ship with
  scikit-learn, split into train/test by a seed.
* :func:`load_cifar10`: CIFAR-10 from a local directory in the python-pickle
  layout of ``cifar-10-python.tar.gz`` (``data_batch_1`` ... ``data_batch_5``,
  ``test_batch``). Fetching it is left to the user.

Images are NHWC float32, standardised with statistics of the training split
only (so the test split does not leak into them). Labels are int32.
:func:`random_shift` is a cheap augmentation and :func:`batches` a minimal
epoch iterator; both run on the host with NumPy.
"""

from __future__ import annotations

import numbers
import os
import pickle
import typing as tp

import numpy as np

from talr_optax import _checks

__all__ = [
    "Split",
    "Dataset",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10_TEST_FILE",
    "load_digits",
    "load_cifar10",
    "random_shift",
    "batches",
]

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
# The directory name inside the official archive; accepted as a sub-directory.
_CIFAR10_SUBDIR = "cifar-10-batches-py"


class Split(tp.NamedTuple):
  """Images ``(N, H, W, C)`` float32 and labels ``(N,)`` int32."""

  images: np.ndarray
  labels: np.ndarray


class Dataset(tp.NamedTuple):
  """A train and a test :class:`Split` and the number of classes."""

  train: Split
  test: Split
  num_classes: int


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean/std of ``train`` applied to both (float32)."""
  # One channel at a time: float64 temporaries of all of CIFAR-10 would
  # take 1.2 GB; NumPy's pairwise float32 sums are accurate enough.
  channels = range(train.shape[-1])
  mean = np.array([train[..., c].mean() for c in channels], np.float32)
  std = np.array([train[..., c].std() for c in channels], np.float32)
  std = np.where(std > 0, std, np.float32(1.0))

  def apply(x: np.ndarray) -> np.ndarray:
    return ((x - mean) / std).astype(np.float32)

  return apply(train), apply(test)


_DIGITS_SIZE, _DIGITS_CLASSES = 1797, 10


def _is_int(x: tp.Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """scikit-learn's 8x8 digits, split into train and test by ``seed``.

  The split is stratified by class and depends only on ``seed`` and
  ``test_fraction``.

  Args:
    test_fraction: fraction of the 1,797 images in the test split, in (0, 1).
    seed: seed of the split.

  Returns:
    A :class:`Dataset` with images ``(N, 8, 8, 1)`` standardised by the
    training split's mean and std, and 10 classes.

  Raises:
    ValueError: if ``test_fraction`` is not in (0, 1) or leaves fewer than 10
      images (one per class) in a split, i.e. outside about [0.0051, 0.9944];
      if ``seed`` is not an int in [0, 2**32 - 1].
  """
  _checks.check_number("test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
  # scikit-learn's rule: ceil(test_fraction * n) test images; a stratified
  # split needs one image of each class on each side.
  n_test = int(np.ceil(float(test_fraction) * _DIGITS_SIZE))
  if not _DIGITS_CLASSES <= n_test <= _DIGITS_SIZE - _DIGITS_CLASSES:
    lo = (_DIGITS_CLASSES - 1) / _DIGITS_SIZE
    hi = (_DIGITS_SIZE - _DIGITS_CLASSES) / _DIGITS_SIZE
    raise ValueError(
        f"test_fraction must leave at least {_DIGITS_CLASSES} of the {_DIGITS_SIZE} images "
        f"(one per class) in each split, i.e. be in ({lo:.4f}, {hi:.4f}], got "
        f"test_fraction = {test_fraction!r} ({n_test} test images)."
    )
  _checks.check_int("seed", seed, 0, 2**32 - 1)
  # Imported here: scikit-learn is heavy and only this loader needs it.
  from sklearn import datasets, model_selection

  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None]  # values 0..16
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(len(labels)), test_size=float(test_fraction), random_state=int(seed),
      stratify=labels
  )
  train_x, test_x = _standardise(images[train_idx], images[test_idx])
  return Dataset(
      train=Split(train_x, labels[train_idx]),
      test=Split(test_x, labels[test_idx]),
      num_classes=10,
  )


_CIFAR10_EXPECTED = ("expected data: an integer array (N, 3072) with values in [0, 255], "
                     "N >= 1; labels: N integers in [0, 9]")


def _read_cifar_pickle(path: str) -> dict[bytes, tp.Any]:
  """The dict in one CIFAR-10 pickle, with keys ``b'data'`` and ``b'labels'``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CIFAR-10 file not found: {path}")
  try:
    with open(path, "rb") as f:
      # The archive was pickled by Python 2: keys are bytes.
      batch = pickle.load(f, encoding="bytes")
  except Exception as e:  # pickle raises many types on corrupt input
    raise ValueError(f"CIFAR-10 file {path} is corrupt or not a pickle: {e!r}") from e
  if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(
        f"CIFAR-10 file {path} is corrupt: expected a dict with keys b'data' and "
        f"b'labels', got {keys}."
    )
  return batch


def _check_integers(path: str, name: str, values: np.ndarray, high: int) -> None:
  """Checked, not cast: astype(uint8) would wrap 300 to 44 and truncate 0.5 to 0."""
  if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() > high:
    got = (f"values in [{values.min()}, {values.max()}]"
           if np.issubdtype(values.dtype, np.number) else "non-numeric values")
    raise ValueError(
        f"CIFAR-10 file {path} is corrupt: {_CIFAR10_EXPECTED}; got {name} of dtype "
        f"{values.dtype} with {got}."
    )


def _load_cifar_file(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one CIFAR-10 pickle: ``(N, 32, 32, 3)`` uint8 images, int32 labels."""
  batch = _read_cifar_pickle(path)
  try:
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
  except ValueError as e:  # ragged nested lists
    raise ValueError(
        f"CIFAR-10 file {path} is corrupt: {_CIFAR10_EXPECTED}; got ragged data or labels: {e}"
    ) from e
  if (data.ndim != 2 or data.shape[0] < 1 or data.shape[1] != 3 * 32 * 32
      or labels.shape != (data.shape[0],)):
    raise ValueError(
        f"CIFAR-10 file {path} is corrupt: {_CIFAR10_EXPECTED}; got data of shape "
        f"{data.shape} and labels of shape {labels.shape}."
    )
  _check_integers(path, "data", data, 255)
  _check_integers(path, "labels", labels, 9)
  # Rows are channel-major (1024 red, 1024 green, 1024 blue); make them NHWC.
  images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels.astype(np.int32)


def load_cifar10(data_dir: str | os.PathLike[str]) -> Dataset:
  """CIFAR-10 from a local directory in the python-pickle layout.

  Only load files you trust: they are unpickled.

  Args:
    data_dir: directory holding ``data_batch_1`` ... ``data_batch_5`` and
      ``test_batch``, or holding the archive's ``cifar-10-batches-py``
      directory.

  Returns:
    A :class:`Dataset`: 50,000 train and 10,000 test images ``(N, 32, 32, 3)``
    scaled to [0, 1] and standardised per channel by the training split.

  Raises:
    TypeError: if ``data_dir`` is not a path (str or os.PathLike).
    FileNotFoundError: naming the missing directory or the first missing
      file.
    ValueError: naming a file that is corrupt: not a pickle, not a dict with
      ``b'data'`` and ``b'labels'``, data not ``(N, 3072)`` integers in
      [0, 255], labels not ``N`` integers in [0, 9].
  """
  if not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(
        "data_dir must be a path (str or os.PathLike) to the directory with "
        f"{CIFAR10_TRAIN_FILES[0]}, ..., {CIFAR10_TEST_FILE}, got data_dir of type "
        f"{type(data_dir).__name__}: {data_dir!r}"
    )
  data_dir = os.fspath(data_dir)
  nested = os.path.join(data_dir, _CIFAR10_SUBDIR)
  if not os.path.exists(os.path.join(data_dir, CIFAR10_TRAIN_FILES[0])) and os.path.isdir(nested):
    data_dir = nested
  if not os.path.isdir(data_dir):
    what = "is a file, not a directory" if os.path.exists(data_dir) else "not found"
    raise FileNotFoundError(
        f"CIFAR-10 directory {what}: data_dir = {data_dir} (expected "
        f"{CIFAR10_TRAIN_FILES[0]}, ..., {CIFAR10_TEST_FILE} in it)"
    )
  parts = [_load_cifar_file(os.path.join(data_dir, name)) for name in CIFAR10_TRAIN_FILES]
  test_x, test_y = _load_cifar_file(os.path.join(data_dir, CIFAR10_TEST_FILE))
  train_x = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
  train_y = np.concatenate([p[1] for p in parts])
  train_x, test_x = _standardise(train_x, test_x.astype(np.float32) / 255.0)
  return Dataset(train=Split(train_x, train_y), test=Split(test_x, test_y), num_classes=10)


def _check_images(images: tp.Any, owner: str) -> None:
  if not isinstance(images, np.ndarray):
    raise TypeError(
        f"{owner}: images must be a NumPy array (N, H, W, C), got images of type "
        f"{type(images).__name__}."
    )
  if images.ndim != 4:
    raise ValueError(
        f"{owner}: images must have shape (N, H, W, C), got images of shape {images.shape}."
    )


def _check_rng(rng: tp.Any, owner: str, allow_none: bool, methods: tuple[str, ...]) -> None:
  if rng is None and allow_none:
    return
  # Duck-typed: anything with the Generator methods used here (tests pass stand-ins).
  if not all(callable(getattr(rng, m, None)) for m in methods):
    none = " or None" if allow_none else ""
    raise TypeError(
        f"{owner}: rng must be a np.random.Generator (e.g. np.random.default_rng(0)){none}, "
        f"got rng of type {type(rng).__name__}."
    )


def random_shift(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    max_shift: int = 1,
    flip: bool = False,
) -> np.ndarray:
  """Shifts each image by up to ``max_shift`` pixels (zero fill), optionally flips.

  With ``max_shift=4, flip=True`` this is the standard CIFAR augmentation
  (pad 4, random 32x32 crop, random horizontal flip). Zero is the mean of
  standardised images, so the fill adds no bias.

  Args:
    images: ``(N, H, W, C)``.
    rng: NumPy random generator (one shift per image).
    max_shift: largest shift in pixels along each axis (>= 0).
    flip: also flip each image left-right with probability 1/2.

  Returns:
    New array, same shape and dtype as ``images``.

  Raises:
    TypeError: ``images`` is not a NumPy array or ``rng`` not a
      ``np.random.Generator``.
    ValueError: ``images`` is not 4-D, ``max_shift`` is not an int in
      ``[0, min(H, W) - 1]`` (a larger shift would blank whole images),
      ``flip`` is not a bool.
  """
  _check_images(images, "random_shift")
  _check_rng(rng, "random_shift", allow_none=False, methods=("integers", "random"))
  n, h, w, _ = images.shape
  if not _is_int(max_shift) or not 0 <= max_shift <= min(h, w) - 1:
    raise ValueError(
        f"max_shift must be an int in [0, min(H, W) - 1] = [0, {min(h, w) - 1}] for images "
        f"of shape {images.shape}, got max_shift = {max_shift!r}."
    )
  _checks.check_bool("flip", flip)
  p = int(max_shift)
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
  dy = rng.integers(0, 2 * p + 1, size=n)
  dx = rng.integers(0, 2 * p + 1, size=n)
  # Gather crops with broadcast indices instead of a Python loop over images.
  rows = (dy[:, None] + np.arange(h))[:, :, None]
  cols = (dx[:, None] + np.arange(w))[:, None, :]
  out = padded[np.arange(n)[:, None, None], rows, cols]
  if flip:
    flipped = rng.random(n) < 0.5
    out[flipped] = out[flipped, :, ::-1]
  return out


def _split_size(split: tp.Any) -> int:
  """The number of examples of a :class:`Split`, checked."""
  images = getattr(split, "images", None)
  labels = getattr(split, "labels", None)
  if not hasattr(images, "shape") or not hasattr(labels, "shape"):
    raise TypeError(
        "batches: split must be a Split(images, labels) of NumPy arrays, got split of "
        f"type {type(split).__name__}."
    )
  if len(images) != len(labels):
    raise ValueError(
        f"batches: split.images and split.labels must have the same length, got "
        f"{len(images)} images and {len(labels)} labels."
    )
  return len(labels)


def _check_batch_size(batch_size: tp.Any, n: int, drop_last: bool) -> int:
  batch_size = _checks.check_int("batch_size", batch_size, 1)
  if drop_last and batch_size > n:
    raise ValueError(
        f"batch_size must be <= the number of examples ({n}) with drop_last=True (the "
        f"epoch would be empty), got batch_size = {batch_size!r}; pass drop_last=False "
        "for one smaller batch."
    )
  return batch_size


def batches(
    split: Split,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    drop_last: bool = True,
    augment: tp.Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> tp.Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of ``(images, labels)`` batches.

  Args:
    split: the data.
    batch_size: examples per batch (>= 1).
    rng: shuffles the order (and drives ``augment``); ``None`` keeps the order.
    drop_last: skip a last, smaller batch (keeps one compiled shape under jit).
    augment: ``augment(images, rng)`` applied per batch, e.g.
      ``functools.partial(random_shift, max_shift=1)``; needs ``rng``.

  Returns:
    An iterator of ``(images, labels)`` NumPy arrays. Arguments are checked
    at the call, not at the first ``next``.

  Raises:
    TypeError: ``split`` has no ``images`` and ``labels`` arrays, ``rng`` is
      not a generator, ``augment`` is not callable.
    ValueError: ``images`` and ``labels`` of different lengths,
      ``batch_size`` not an int >= 1 (and, with ``drop_last``, not above
      the number of examples, which would give an empty epoch), ``augment``
      without ``rng``.
  """
  n = _split_size(split)
  batch_size = _check_batch_size(batch_size, n, drop_last)
  _check_rng(rng, "batches", allow_none=True, methods=("permutation",))
  if augment is not None and not callable(augment):
    raise TypeError(
        "batches: augment must be None or a callable augment(images, rng), got augment "
        f"of type {type(augment).__name__}."
    )
  if augment is not None and rng is None:
    raise ValueError("augment needs rng, got rng = None.")
  order = rng.permutation(n) if rng is not None else np.arange(n)
  stop = n - n % batch_size if drop_last else n

  def iterate() -> tp.Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, stop, batch_size):
      idx = order[start:start + batch_size]
      x = split.images[idx]
      if augment is not None:
        x = augment(x, rng)
      yield x, split.labels[idx]

  return iterate()
