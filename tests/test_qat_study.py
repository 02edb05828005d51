"""The QAT study (benchmarks/qat_study.py): a --quick run's schema, its statistics
recomputed from its own runs, a rerun giving identical numbers, and the committed
quick.json having the same rows.

Never asserts a time or a training result: only structure, arithmetic the file
must satisfy, and determinism.
"""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import qat_study  # noqa: E402  pylint: disable=wrong-import-position

ROW_KEYS = {"task", "bits", "arm", "seeds", "metric", "mean", "std",
            "paired_diff_vs_best_baseline", "paired_diff_ci95", "tracking_error",
            "late_oscillation", "frozen_fraction", "tuned_value"}
MACHINE_KEYS = {"cpu_model", "cpu_count", "jax", "jaxlib", "optax", "flax", "xla_flags",
                "onednn_max_cpu_isa"}
QAT_ARMS = ("adamw", "adamw_dampening", "adamw_freezing", "adamwt", "adamwt_freezing")


def _check_schema(results):
  assert MACHINE_KEYS <= set(results["machine"])
  rows = results["summary"]
  bits = tuple(results["config"]["bits"])
  assert {(r["bits"], r["arm"]) for r in rows} == (
      {(None, qat_study.FP_REFERENCE)} | {(b, a) for b in bits for a in QAT_ARMS})
  values = {a["name"]: a["values"] for a in results["arms"]}
  for r in rows:
    assert ROW_KEYS <= set(r), r["arm"]
    assert r["task"] == "lm" and r["metric"] == "bits_per_byte"
    assert r["seeds"] == list(range(1, results["config"]["seeds"] + 1))  # not the tuning seed
    assert r["tuned_value"] in values[r["arm"]]
    assert (r["frozen_fraction"] is not None) == r["arm"].endswith("freezing")
    if r["frozen_fraction"] is not None:
      assert 0.0 <= r["frozen_fraction"] <= 1.0
    if r["bits"] is None:
      assert r["paired_diff_ci95"] is None and r["tracking_error"] is None
      continue
    assert r["tracking_error"] >= 0 and r["late_oscillation"] >= 0
    low, high = r["paired_diff_ci95"]
    assert low <= r["paired_diff_vs_best_baseline"] <= high
    assert r["conclusion"] == ("better" if high < 0 else "worse" if low > 0
                               else "no detectable difference")


def _check_statistics(results):
  """Means, stds and paired intervals recomputed from the runs (NumPy, SciPy)."""
  runs = results["runs"]
  final = {(r["bits"], r["arm"], r["seed"]): r["final"] for r in runs}
  for r in results["summary"]:
    mine = [final[r["bits"], r["arm"], s] for s in r["seeds"]]
    assert r["mean"] == pytest.approx(np.mean(mine), rel=1e-12)
    assert r["std"] == pytest.approx(np.std(mine, ddof=1), rel=1e-12)
    if r["bits"] is None:
      continue
    baselines = [x for x in results["summary"] if x["bits"] == r["bits"]
                 and x["arm"] in qat_study.BASELINES]
    best = min(baselines, key=lambda x: x["mean"])
    assert r["best_baseline"] == (best["arm"] if r is not best else
                                  sorted(baselines, key=lambda x: x["mean"])[1]["arm"])
    d = np.array(mine) - np.array([final[r["bits"], r["best_baseline"], s] for s in r["seeds"]])
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert r["paired_diff_vs_best_baseline"] == pytest.approx(d.mean(), abs=1e-12)
    np.testing.assert_allclose(r["paired_diff_ci95"], [d.mean() - half, d.mean() + half],
                               rtol=1e-9, atol=1e-12)
    if r["arm"] == "adamw":
      assert r["paired_diff_vs_adamw"] is None
      continue
    d = np.array(mine) - np.array([final[r["bits"], "adamw", s] for s in r["seeds"]])
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert r["paired_diff_vs_adamw"] == pytest.approx(d.mean(), abs=1e-12)
    np.testing.assert_allclose(r["paired_diff_vs_adamw_ci95"], [d.mean() - half, d.mean() + half],
                               rtol=1e-9, atol=1e-12)
    assert r["better_than_adamw_on_seeds"] == int((d < 0).sum())


def _numbers(results):
  return {"summary": results["summary"], "runs": results["runs"],
          "tuning_runs": results["tuning_runs"], "pretraining": results["pretraining"]}


def test_quick_run_schema_statistics_and_identical_rerun(tmp_path):
  first = qat_study.main(["--quick", "--out", str(tmp_path / "a")])
  with open(tmp_path / "a" / "quick.json") as f:
    saved = json.load(f)
  assert json.loads(json.dumps(_numbers(first))) == _numbers(saved)
  _check_schema(saved)
  _check_statistics(saved)
  assert saved["machine"]["onednn_max_cpu_isa"] == os.environ.get("ONEDNN_MAX_CPU_ISA")
  for name in saved["figures"]:
    assert (tmp_path / "a" / name).stat().st_size > 0
  second = qat_study.main(["--quick", "--out", str(tmp_path / "b")])
  assert _numbers(second) == _numbers(first)


def test_committed_quick_json_has_the_schema_and_its_statistics():
  with open(BENCH / "results" / "qat_study" / "quick.json") as f:
    saved = json.load(f)
  assert saved["config"]["quick"]
  _check_schema(saved)
  _check_statistics(saved)


def test_committed_full_run_has_the_schema_its_statistics_and_the_issue_s_size():
  with open(BENCH / "results" / "qat_study" / "results.json") as f:
    saved = json.load(f)
  cfg = saved["config"]
  assert not cfg["quick"] and cfg["seeds"] >= 5 and cfg["steps"] >= 2000
  assert set(cfg["bits"]) >= {2, 3}
  assert saved["model"]["quantized_parameters"] > 98_304  # the demo's language model
  assert all(len(a["values"]) == 3 for a in saved["arms"])  # one tuning budget for all
  _check_schema(saved)
  _check_statistics(saved)
  assert "/" not in " ".join(saved["machine"]["argv"])  # no machine paths in the file
  for name in saved["figures"]:
    assert (BENCH / "results" / "qat_study" / name).stat().st_size > 0


def test_from_results_recomputes_the_committed_summary_without_training(tmp_path):
  source = BENCH / "results" / "qat_study" / "quick.json"
  with open(source) as f:
    saved = json.load(f)
  for row in saved["summary"]:  # what a summary computed by older code would lack
    row.pop("paired_diff_vs_adamw", None)
    row["paired_diff_ci95"] = None
  stale = tmp_path / "quick.json"
  stale.write_text(json.dumps(saved))
  again = qat_study.main(["--from-results", str(stale), "--out", str(tmp_path / "out")])
  with open(source) as f:
    assert again["summary"] == json.load(f)["summary"]
  assert (tmp_path / "out" / "quick.json").exists()


@pytest.mark.parametrize("content, message", [
    (None, "cannot read a results file"), ("{not json", "cannot read a results file"),
    ('{"summary": []}', "has no 'summary' and 'runs'"),
])
def test_from_results_refuses_what_is_not_a_results_file(tmp_path, capsys, content, message):
  path = tmp_path / "r.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(SystemExit) as exit_info:
    qat_study.main(["--from-results", str(path), "--out", str(tmp_path / "out")])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_unknown_arm_is_refused(capsys):
  with pytest.raises(SystemExit):
    qat_study.main(["--quick", "--arms", "adamw,sgd"])
  assert "--arms: unknown ['sgd']" in capsys.readouterr().err
