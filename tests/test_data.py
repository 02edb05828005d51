"""Tests for talr_optax.demo.data: digits split, CIFAR-10 pickle loader, batching."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from talr_optax.demo import data


@pytest.fixture(scope="module")
def raw_digits():
  from sklearn import datasets

  return datasets.load_digits()


def _raw_rows(images: np.ndarray, train_images: np.ndarray) -> np.ndarray:
  """Undoes the standardisation: pixels 0 and 16 are the train min and max."""
  lo, hi = float(train_images.min()), float(train_images.max())
  std = 16.0 / (hi - lo)
  raw = images * std - lo * std
  np.testing.assert_allclose(raw, np.round(raw), atol=1e-3)  # integer pixels
  return np.round(raw).reshape(len(images), 64).astype(np.int64)


def _row_index(raw_digits) -> dict[bytes, int]:
  return {row.astype(np.int64).tobytes(): i for i, row in enumerate(raw_digits.data)}


def test_digits_split_shapes_disjoint_and_normalised(raw_digits):
  ds = data.load_digits(test_fraction=0.2, seed=0)
  assert ds.num_classes == 10
  assert ds.train.images.shape == (1437, 8, 8, 1) and ds.test.images.shape == (360, 8, 8, 1)
  assert ds.train.images.dtype == np.float32 and ds.train.labels.dtype == np.int32
  # Standardised by the train split: mean 0 and std 1 there.
  assert abs(float(ds.train.images.mean())) < 1e-5
  assert abs(float(ds.train.images.std()) - 1.0) < 1e-5
  index = _row_index(raw_digits)
  train_rows = _raw_rows(ds.train.images, ds.train.images)
  test_rows = _raw_rows(ds.test.images, ds.train.images)
  train_idx = [index[r.tobytes()] for r in train_rows]  # KeyError: not a digits image
  test_idx = [index[r.tobytes()] for r in test_rows]
  assert not set(train_idx) & set(test_idx)
  assert sorted(train_idx + test_idx) == list(range(1797))
  np.testing.assert_array_equal(ds.train.labels, raw_digits.target[train_idx])
  np.testing.assert_array_equal(ds.test.labels, raw_digits.target[test_idx])
  # The std used is that of the raw train pixels.
  raw_train = raw_digits.data[train_idx]
  lo = float(ds.train.images.min())
  np.testing.assert_allclose(-lo * raw_train.std(), raw_train.mean(), rtol=1e-4)
  # Stratified: every class in both splits.
  assert set(ds.test.labels) == set(range(10))


def test_digits_split_is_deterministic_by_seed():
  a, b = data.load_digits(seed=3), data.load_digits(seed=3)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  np.testing.assert_array_equal(a.test.labels, b.test.labels)
  c = data.load_digits(seed=4)
  assert not np.array_equal(a.test.labels, c.test.labels)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, "0.2"])
def test_digits_bad_test_fraction(bad):
  with pytest.raises(ValueError, match="test_fraction"):
    data.load_digits(test_fraction=bad)


def test_random_shift_hand_computed():
  class FixedRng:
    """Stands in for np.random.Generator with chosen draws."""

    def __init__(self, dy, dx, flips):
      self.draws = [np.array(dy), np.array(dx)]
      self.flips = np.array(flips)

    def integers(self, low, high, size):
      assert (low, high, size) == (0, 3, 2)
      return self.draws.pop(0)

    def random(self, n):
      return self.flips

  img = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)
  images = np.concatenate([img, img])
  # dy index 0 = shift down by one, 2 = up by one; dx index 1 = no shift.
  out = data.random_shift(images, FixedRng([0, 2], [1, 2], [0.9, 0.1]), max_shift=1, flip=True)
  np.testing.assert_array_equal(out[0, ..., 0], [[0, 0, 0], [1, 2, 3], [4, 5, 6]])
  # Second image: up one, left one, then flipped left-right.
  np.testing.assert_array_equal(out[1, ..., 0], [[0, 6, 5], [0, 9, 8], [0, 0, 0]])
  assert out.dtype == np.float32
  np.testing.assert_array_equal(
      data.random_shift(images, np.random.default_rng(0), max_shift=0), images)
  with pytest.raises(ValueError, match="max_shift"):
    data.random_shift(images, np.random.default_rng(0), max_shift=-1)


def test_batches():
  split = data.Split(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1),
                     np.arange(10, dtype=np.int32))
  ordered = list(data.batches(split, 4))
  assert [b[1].tolist() for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert [len(b[1]) for b in data.batches(split, 4, drop_last=False)] == [4, 4, 2]
  shuffled = list(data.batches(split, 5, rng=np.random.default_rng(1)))
  labels = np.concatenate([b[1] for b in shuffled])
  assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))
  again = np.concatenate([b[1] for b in data.batches(split, 5, rng=np.random.default_rng(1))])
  np.testing.assert_array_equal(labels, again)
  for x, y in shuffled:
    np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # images stay with their labels
  with pytest.raises(ValueError, match="batch_size"):
    data.batches(split, 0)
  with pytest.raises(ValueError, match="rng"):
    data.batches(split, 2, augment=data.random_shift)


# ---------------------------------------------------------------------------
# CIFAR-10


def _write_cifar(directory, n_train=3, n_test=2):
  """A miniature CIFAR-10 in the python-pickle layout; returns the raw arrays."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  raw = {}
  for name in (*data.CIFAR10_TRAIN_FILES, data.CIFAR10_TEST_FILE):
    n = n_test if name == data.CIFAR10_TEST_FILE else n_train
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    with open(os.path.join(directory, name), "wb") as f:
      # Protocol 2 and bytes keys, like the official (Python 2) files.
      pickle.dump({b"batch_label": name.encode(), b"data": pixels, b"labels": labels,
                   b"filenames": [b"x.png"] * n}, f, protocol=2)
    raw[name] = (pixels, labels)
  return raw


def test_cifar10_loads_nhwc_and_standardises(tmp_path):
  raw = _write_cifar(tmp_path)
  ds = data.load_cifar10(tmp_path)
  assert ds.train.images.shape == (15, 32, 32, 3) and ds.test.images.shape == (2, 32, 32, 3)
  assert ds.train.images.dtype == np.float32 and ds.train.labels.dtype == np.int32
  train_pixels = np.concatenate([raw[n][0] for n in data.CIFAR10_TRAIN_FILES]) / 255.0
  train_labels = np.concatenate([raw[n][1] for n in data.CIFAR10_TRAIN_FILES])
  np.testing.assert_array_equal(ds.train.labels, train_labels)
  np.testing.assert_array_equal(ds.test.labels, raw["test_batch"][1])
  # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32 x 32.
  channel_major = train_pixels.reshape(15, 3, 1024)
  mean = channel_major.mean(axis=(0, 2))
  std = channel_major.std(axis=(0, 2))
  n, r, c, ch = 7, 5, 30, 2
  expected = (train_pixels[n, ch * 1024 + r * 32 + c] - mean[ch]) / std[ch]
  np.testing.assert_allclose(ds.train.images[n, r, c, ch], expected, rtol=1e-5)
  test_pixel = raw["test_batch"][0][1, 1 * 1024 + 31 * 32 + 0] / 255.0
  np.testing.assert_allclose(ds.test.images[1, 31, 0, 1], (test_pixel - mean[1]) / std[1],
                             rtol=1e-5)
  # The archive's own directory name is found one level down.
  _write_cifar(tmp_path / "outer" / "cifar-10-batches-py")
  assert data.load_cifar10(tmp_path / "outer").train.images.shape == (15, 32, 32, 3)


def test_cifar10_missing_dir_and_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    data.load_cifar10(tmp_path / "nowhere")
  _write_cifar(tmp_path)
  os.remove(tmp_path / "data_batch_3")
  with pytest.raises(FileNotFoundError, match="data_batch_3"):
    data.load_cifar10(tmp_path)
  _write_cifar(tmp_path)
  os.remove(tmp_path / "test_batch")
  with pytest.raises(FileNotFoundError, match="test_batch"):
    data.load_cifar10(tmp_path)


@pytest.mark.parametrize("content", [
    b"\x00\x01 definitely not a pickle",
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2),  # no labels
    pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2),
    pickle.dumps([1, 2, 3], protocol=2),
], ids=["not_a_pickle", "no_labels", "wrong_shape", "not_a_dict"])
def test_cifar10_corrupt_file(tmp_path, content):
  _write_cifar(tmp_path)
  (tmp_path / "data_batch_2").write_bytes(content)
  with pytest.raises(ValueError, match="data_batch_2.*corrupt"):
    data.load_cifar10(tmp_path)


def test_data_module_imports_neither_flax_nor_orbax():
  code = ("import sys, talr_optax.demo.data; "
          "heavy = [m for m in ('flax', 'orbax', 'sklearn') if m in sys.modules]; "
          "assert not heavy, heavy")
  subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the argument and the accepted values.


@pytest.mark.parametrize("bad", [0.001, 9 / 1797, 0.999, 1787.5 / 1797])
def test_digits_test_fraction_leaving_a_class_out_of_a_split(bad):
  with pytest.raises(ValueError, match=r"test_fraction must leave at least 10 of the 1797 "
                                       r"images .* in \(0.0050, 0.9944\]"):
    data.load_digits(test_fraction=bad)


def test_digits_test_fraction_range_edges_are_accepted():
  lo = data.load_digits(test_fraction=9.001 / 1797)
  hi = data.load_digits(test_fraction=1787 / 1797)
  assert len(lo.test.labels) == 10 and len(hi.train.labels) == 10


@pytest.mark.parametrize("bad", [float("nan"), True, None, [0.2]], ids=repr)
def test_digits_bad_test_fraction_types(bad):
  with pytest.raises(ValueError,
                     match=r"test_fraction must be (in \(0, 1\)|a real number), got test_frac"):
    data.load_digits(test_fraction=bad)


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "0", None, True], ids=repr)
def test_digits_bad_seed(bad):
  with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\], got seed"):
    data.load_digits(seed=bad)


def test_digits_numpy_numbers_accepted():
  a = data.load_digits(test_fraction=np.float32(0.25), seed=np.int64(1))
  b = data.load_digits(test_fraction=0.25, seed=1)
  np.testing.assert_array_equal(a.test.labels, b.test.labels)


@pytest.mark.parametrize("bad", [None, 3, b"/tmp".decode, ["dir"]],
                         ids=["None", "int", "fn", "list"])
def test_cifar10_data_dir_not_a_path(bad):
  with pytest.raises(TypeError, match="data_dir must be a path"):
    data.load_cifar10(bad)


def test_cifar10_data_dir_is_a_file(tmp_path):
  _write_cifar(tmp_path)
  with pytest.raises(FileNotFoundError,
                     match="is a file, not a directory: data_dir = .*test_batch"):
    data.load_cifar10(tmp_path / "test_batch")


def _pickled(batch):
  return pickle.dumps(batch, protocol=2)


_PIXELS = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize("content, match", [
    (_pickled({b"data": np.full((2, 3072), 0.5), b"labels": [0, 1]}),
     r"data of dtype float64"),
    (_pickled({b"data": np.full((2, 3072), 300), b"labels": [0, 1]}),
     r"values in \[300, 300\]"),
    (_pickled({b"data": np.full((2, 3072), -1), b"labels": [0, 1]}), r"values in \[-1, -1\]"),
    (_pickled({b"data": _PIXELS, b"labels": [0.5, 1.5]}), r"labels of dtype float64"),
    (_pickled({b"data": _PIXELS, b"labels": [0, 10]}), r"labels of dtype .* values in \[0, 10\]"),
    (_pickled({b"data": _PIXELS, b"labels": ["a", "b"]}), r"non-numeric values"),
    (_pickled({b"data": _PIXELS, b"labels": [[0], [1]]}), r"labels of shape \(2, 1\)"),
    (_pickled({b"data": _PIXELS, b"labels": [0, 1, 2]}), r"labels of shape \(3,\)"),
    (_pickled({b"data": [[1, 2], [3]], b"labels": [0, 1]}), r"ragged"),
    (_pickled({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}),
     r"data of shape \(0, 3072\)"),
    (_pickled({b"data": np.zeros((2, 32, 32, 3), np.uint8), b"labels": [0, 1]}),
     r"data of shape \(2, 32, 32, 3\)"),
], ids=["float_pixels", "pixels_300", "pixels_negative", "float_labels", "label_10",
        "string_labels", "labels_2d", "labels_count", "ragged", "empty", "nhwc_data"])
def test_cifar10_wrong_contents_in_pickle(tmp_path, content, match):
  _write_cifar(tmp_path)
  (tmp_path / "test_batch").write_bytes(content)
  with pytest.raises(ValueError, match=r"test_batch is corrupt: expected data: an integer "
                                       r"array \(N, 3072\) with values in \[0, 255\].*" + match):
    data.load_cifar10(tmp_path)


_IMAGES = np.zeros((3, 4, 5, 1), np.float32)
_RNG = np.random.default_rng(0)


@pytest.mark.parametrize("thunk, exc, match", [
    (lambda: data.random_shift(_IMAGES[0], _RNG), ValueError,
     r"random_shift: images must have shape \(N, H, W, C\), got images of shape \(4, 5, 1\)"),
    (lambda: data.random_shift(_IMAGES.tolist(), _RNG), TypeError,
     r"images must be a NumPy array \(N, H, W, C\), got images of type list"),
    (lambda: data.random_shift(_IMAGES, 0), TypeError,
     r"random_shift: rng must be a np.random.Generator .*got rng of type int"),
    (lambda: data.random_shift(_IMAGES, _RNG, max_shift=4), ValueError,
     r"max_shift must be an int in \[0, min\(H, W\) - 1\] = \[0, 3\] .*got max_shift = 4"),
    (lambda: data.random_shift(_IMAGES, _RNG, max_shift=1.0), ValueError, r"max_shift = 1.0"),
    (lambda: data.random_shift(_IMAGES, _RNG, max_shift=True), ValueError, r"max_shift = True"),
    (lambda: data.random_shift(_IMAGES, _RNG, flip="yes"), ValueError,
     r"flip must be True or False, got flip = 'yes'"),
], ids=["3d", "list", "rng_int", "shift_too_big", "shift_float", "shift_bool", "flip_str"])
def test_random_shift_bad_input(thunk, exc, match):
  with pytest.raises(exc, match=match):
    thunk()


_SPLIT = data.Split(np.zeros((5, 1, 1, 1), np.float32), np.arange(5, dtype=np.int32))


@pytest.mark.parametrize("thunk, exc, match", [
    (lambda: data.batches((_SPLIT.images, _SPLIT.labels), 2), TypeError,
     r"batches: split must be a Split\(images, labels\) of NumPy arrays, got split of type tuple"),
    (lambda: data.batches(data.Split(_SPLIT.images, _SPLIT.labels[:4]), 2), ValueError,
     r"split.images and split.labels must have the same length, got 5 images and 4 labels"),
    (lambda: data.batches(_SPLIT, 6), ValueError,
     r"batch_size must be <= the number of examples \(5\) with drop_last=True"),
    (lambda: data.batches(_SPLIT, 2.0), ValueError,
     r"batch_size must be an integer >= 1, got batch_size = 2.0"),
    (lambda: data.batches(_SPLIT, True), ValueError,
     r"batch_size must be an integer >= 1, got batch_size = True"),
    (lambda: data.batches(_SPLIT, 2, rng=0), TypeError,
     r"batches: rng must be a np.random.Generator .*or None, got rng of type int"),
    (lambda: data.batches(_SPLIT, 2, rng=_RNG, augment="shift"), TypeError,
     r"augment must be None or a callable augment\(images, rng\)"),
], ids=["tuple", "length_mismatch", "empty_epoch", "float_size", "bool_size", "rng_int",
        "augment_str"])
def test_batches_bad_input(thunk, exc, match):
  with pytest.raises(exc, match=match):
    thunk()


def test_batches_and_random_shift_accept_numpy_integers():
  assert [len(y) for _, y in data.batches(_SPLIT, np.int64(2))] == [2, 2]
  assert [len(y) for _, y in data.batches(_SPLIT, 6, drop_last=False)] == [5]
  out = data.random_shift(_IMAGES, np.random.default_rng(0), max_shift=np.int64(3),
                          flip=np.bool_(True))
  assert out.shape == _IMAGES.shape
