"""Smoke test of benchmarks/: every script runs in its smallest mode, and the two
numbers that do not depend on the machine are checked exactly.

Never asserts a time: the machines that run this are shared and noisy.
Asserted: TALR's extra optimizer state is 1 byte (the int8 level) per quantized
weight plus 20 bytes of float32 rates per quantized tensor and the int32 step
count; and a jitted step recompiles 0 times after the first step while the
rates change.
"""

import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness as H  # noqa: E402  pylint: disable=wrong-import-position


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_state_bytes_exact(tmp_path):
  import state_bytes  # pylint: disable=import-outside-toplevel
  out = tmp_path / "state_bytes.json"
  rows = state_bytes.main(["--sizes", "0.1M", "--no-resnet", "--out", str(out)])
  n = H.n_weights("0.1M")
  n_tensors = len(H.SIZES["0.1M"])
  assert {(r["plain"], r["talr"]) for r in rows} == {("sgd", "sgdt"), ("adam", "adamt")}
  for r in rows:
    assert r["n_quantized"] == n
    assert r["prev_levels_bytes"] == n  # int8: exactly 1 byte per quantized weight
    # k, K, R, U, c: five float32 scalars per quantized tensor; one int32 count.
    assert r["rate_scalar_bytes"] == 5 * 4 * n_tensors + 4
    assert r["other_extra_bytes"] == 0
    assert r["extra_bytes"] == n + 5 * 4 * n_tensors + 4
    assert r["extra_bytes_per_quantized_weight"] <= 1.01
  assert _load(out)["rows"] == rows


def test_recompiles_zero(tmp_path):
  import recompiles  # pylint: disable=import-outside-toplevel
  out = tmp_path / "recompiles.json"
  # The NNX scenario (slow to build) is covered by test_train_step_runs.
  rows = recompiles.main(["--quick", "--steps", "12", "--out", str(out),
                          "--scenarios", "sgdt,adamt,sgdt_inject,sgdt_levels"])
  assert len(rows) == 4
  for r in rows:
    assert r["recompiles_after_first_step"] == 0, r
    assert r["retraces_after_first_step"] == 0, r
    assert r["steps_with_changed_rates"] == r["steps"] - 1, r  # the rates did move


def test_optimizer_step_and_scaling_run(tmp_path):
  import optimizer_step  # pylint: disable=import-outside-toplevel
  import scaling  # pylint: disable=import-outside-toplevel
  out = tmp_path / "optimizer_step.json"
  rows = optimizer_step.main(["--sizes", "0.1M", "--repeats", "2", "--warmup", "0",
                              "--donate", "yes", "--variants", "sgdt,sgdt_levels,adamt",
                              "--out", str(out)])
  assert {r["variant"] for r in rows} == {"sgd", "sgdt", "sgdt_levels", "adam", "adamt"}
  for r in rows:
    assert r["repeats"] == 2 and r["median_ms"] > 0 and r["hlo_bytes_per_weight"] > 0
  res = scaling.main(["--input", str(out), "--out", str(tmp_path / "scaling.json")])
  assert {r["variant"] for r in res} == {"sgd", "sgdt", "sgdt_levels", "adam", "adamt"}


def test_train_step_runs(tmp_path):
  pytest.importorskip("flax")
  import train_step  # pylint: disable=import-outside-toplevel
  out = tmp_path / "train_step.json"
  rows = train_step.main(["--model", "cnn", "--batch", "4", "--repeats", "2", "--warmup", "0",
                          "--style", "nnx,functional", "--out", str(out)])
  assert [(r["style"], r["variant"]) for r in rows] == [
      ("nnx", "sgd"), ("nnx", "sgdt"), ("functional", "sgd"), ("functional", "sgdt")]
  assert _load(out)["meta"]["recompiles_while_timing"] == 0  # NNX steps: no recompiles
  sgd, sgdt = rows[:2]
  assert sgdt["opt_state_bytes"] - sgd["opt_state_bytes"] == (
      sgdt["n_quantized"] + 5 * 4 * sgdt["n_quantized_tensors"] + 4)
