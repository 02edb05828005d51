"""benchmarks/bn_reestimation.py: its paired summary against hand-computed numbers, its
argument checks, and (opt-in, ``-m slow``) a smoke run of the real thing."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bn_reestimation  # noqa: E402  pylint: disable=wrong-import-position

LABELS = {"sgd": "SGD", "talr": "SGDT"}


def _runs(rows):
  return [{"seed": s, "method": m, "test_accuracy": b, "test_accuracy_bn_reestimated": a}
          for s, m, b, a in rows]


def test_summary_pairs_runs_by_seed_in_percentage_points():
  # Seeds listed out of order: pairing must go by seed.
  runs = _runs([(1, "sgd", 0.80, 0.84), (0, "sgd", 0.70, 0.72), (2, "sgd", 0.90, 0.93),
                (2, "talr", 0.91, 0.92), (0, "talr", 0.75, 0.75), (1, "talr", 0.85, 0.86)])
  rows = {r["comparison"]: r for r in bn_reestimation.summarize(runs, LABELS)}
  sgd = rows["SGD: re-estimated minus as trained"]
  assert sgd["mean_before"] == pytest.approx(80.0)
  assert sgd["mean_after"] == pytest.approx(83.0)
  # after minus before, seeds 0, 1, 2: 2, 4, 3 (std 1)
  half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n)
  assert sgd["mean"] == pytest.approx(3.0)
  assert sgd["ci95"] == pytest.approx([3.0 - half, 3.0 + half])
  assert sgd["conclusion"] == "better" and sgd["higher_on"] == 3
  as_trained = rows["SGDT minus SGD, as trained"]  # 5, 5, 1
  assert as_trained["mean"] == pytest.approx(11.0 / 3)
  assert as_trained["higher_on"] == 3
  reestimated = rows["SGDT minus SGD, re-estimated"]  # 3, 2, -1
  assert reestimated["mean"] == pytest.approx(4.0 / 3)
  assert reestimated["conclusion"] == "no detectable difference"
  assert reestimated["higher_on"] == 2


def test_a_lower_accuracy_after_re_estimation_is_worse():
  runs = _runs([(s, m, 0.9, 0.8 - 0.01 * s) for s in range(3) for m in ("sgd", "talr")])
  row = bn_reestimation.summarize(runs, LABELS)[0]
  assert row["conclusion"] == "worse" and row["higher_on"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1"], "--seeds must be an int >= 2"),
    (["--bn-batches", "0"], "--bn-batches must be an int >= 1"),
    (["--epochs", "0"], "--epochs must be an int >= 1"),
])
def test_bad_arguments_exit_with_a_message_before_training(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    bn_reestimation.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_writes_a_paired_summary(tmp_path):
  out = tmp_path / "bn.json"
  results = bn_reestimation.main(["--quick", "--out", str(out)])
  assert out.exists()
  assert [r["method"] for r in results["runs"]] == ["sgd", "talr"] * 2
  assert all(0.0 <= r[k] <= 1.0 for r in results["runs"]
             for k in ("test_accuracy", "test_accuracy_bn_reestimated"))
  assert len(results["summary"]) == 4
