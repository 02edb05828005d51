"""The QAT study (benchmarks/qat_study.py): its tuning rule, flags, statistics and files.

Never asserts a time or a training result: only the procedure (which values
are tried), flags refused before any training, arithmetic the results must
satisfy (recomputed with NumPy and SciPy), determinism, and the committed
files' agreement with their own runs.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import qat_study  # noqa: E402  pylint: disable=wrong-import-position
import _study_tasks  # noqa: E402  pylint: disable=wrong-import-position

COMMITTED = BENCH / "results" / "qat_study"


# ---------------------------------------------------------------------------
# The tuning rule.


def _bracket(scores, start=(1.0, 2.0, 4.0), factor=2.0, upper=math.inf, max_runs=6):
  tried = []

  def score_at(v):
    tried.append(v)
    return scores(v)

  chosen, table, interior = qat_study.bracket(start, factor, upper, max_runs, score_at)
  return chosen, tried, interior, table


def test_bracket_extends_past_the_best_end_until_interior():
  # A minimum at 0.25: two extensions downwards, then interior.
  chosen, tried, interior, _ = _bracket(lambda v: (math.log2(v) + 2) ** 2)
  assert tried == [1.0, 2.0, 4.0, 0.5, 0.25, 0.125] and chosen == 0.25 and interior
  chosen, tried, interior, _ = _bracket(lambda v: (math.log2(v) - 3) ** 2)
  assert tried == [1.0, 2.0, 4.0, 8.0, 16.0] and chosen == 8.0 and interior
  chosen, tried, interior, _ = _bracket(lambda v: (math.log2(v) - 1) ** 2)
  assert tried == [1.0, 2.0, 4.0] and chosen == 2.0 and interior


def test_bracket_stops_at_its_budget_and_its_bound():
  chosen, tried, interior, _ = _bracket(lambda v: -v)  # better and better upwards
  assert len(tried) == 6 and chosen == 32.0 and interior is False
  chosen, tried, interior, _ = _bracket(lambda v: -v, upper=5.0)
  assert tried == [1.0, 2.0, 4.0] and chosen == 4.0 and interior is False


def test_a_diverged_run_is_worse_than_any_other():
  # 8 diverges (NaN): 4 is the best and interior, next to a diverging value.
  chosen, tried, interior, _ = _bracket(lambda v: float("nan") if v >= 8 else -v)
  assert tried == [1.0, 2.0, 4.0, 8.0] and chosen == 4.0 and interior


def test_ties_go_to_the_middle_of_the_grid():
  chosen, tried, interior, _ = _bracket(lambda v: 1.0)
  assert tried == [1.0, 2.0, 4.0] and chosen == 2.0 and interior


def test_every_tuned_arm_has_the_same_budget_and_its_dependencies_first():
  for task in ("lm", "conv"):
    specs = qat_study.arm_specs(task)
    names = [a.name for a in specs]
    for i, a in enumerate(specs):
      assert all(names.index(n) < i for n, _ in a.needs), a.name
      if a.knob is not None:
        assert len(a.start) == 3 and a.start == tuple(sorted(a.start))
    role = qat_study.roles(task)
    assert role["remedies"] == tuple(f"{role['base'][0]}_{r}" for r in ("dampening", "freezing"))
    assert len(role["talr"]) == 4


# ---------------------------------------------------------------------------
# Flags: refused before any training.


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "1"], "--seeds must be an int >= 2"),
    (["--arms", "adamw,nope"], "unknown"),
    (["--arms", "adamw_freezing,adamwt"], "adamw_freezing runs with the tuned values of"),
    (["--arms", "adamw,adamwt_freezing"], "adamwt_freezing runs with the tuned values of"),
    (["--arms", ","], "--arms"),
    (["--width", "100000"], "--width must be an even int in"),
    (["--width", "81"], "--width must be an even int in"),
    (["--task", "conv", "--width", "64"], "--width is the lm model's width"),
    (["--bits", "2,5"], "--bits must be"),
    (["--bits", "two"], "--bits must be"),
    (["--task", "conv", "--arms", "adamw"], "unknown"),
])
def test_bad_flags_exit_before_training(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    qat_study.main(argv + ["--out", "/nonexistent-dir-is-checked-later"])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("task", ["lm", "conv"])
def test_quick_is_the_smoke_setting(task, tmp_path):
  """--quick sets the smoke settings: two values per knob, two seeds, short runs."""
  _, cfg = qat_study._parse(["--task", task, "--quick", "--out", str(tmp_path)])  # pylint: disable=protected-access
  assert cfg.quick and cfg.seeds == 2 and cfg.bits == (2,) and cfg.max_tuning_runs == 2
  assert all(len(a.start) == 2 for a in cfg.specs() if a.knob)
  assert (cfg.lm.steps if task == "lm" else cfg.conv.epochs) < 100
  _, full = qat_study._parse(["--task", task, "--out", str(tmp_path)])  # pylint: disable=protected-access
  assert not full.quick and full.max_tuning_runs == qat_study.MAX_TUNING_RUNS
  assert full.seeds == (12 if task == "lm" else 16)


def test_an_unwritable_out_is_refused_before_training(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(SystemExit):
    qat_study.main(["--task", "conv", "--out", str(blocker / "sub")])
  assert "--out: cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ("not json", "cannot read a results file"),
    ('{"summary": []}', "not a results file of this script"),
])
def test_from_results_refuses_what_is_not_a_results_file(tmp_path, capsys, content, message):
  path = tmp_path / "x.json"
  path.write_text(content)
  with pytest.raises(SystemExit):
    qat_study.main(["--from-results", str(path), "--out", str(tmp_path)])
  assert message in capsys.readouterr().err


def test_from_results_refuses_training_flags(tmp_path, capsys):
  path = tmp_path / "x.json"
  path.write_text('{"runs": [], "tuning": [], "task": {}}')
  with pytest.raises(SystemExit):
    qat_study.main(["--from-results", str(path), "--arms", "adamw", "--seeds", "3",
                    "--out", str(tmp_path)])
  err = capsys.readouterr().err
  assert "--arms" in err and "--seeds" in err and "would be ignored" in err


# ---------------------------------------------------------------------------
# The summary: a function of the runs, checked against SciPy.


def _synthetic_results():
  """Conv-shaped results with known numbers: 3 bit-free seeds, every arm at W2."""
  rng = np.random.default_rng(0)
  role = qat_study.roles("conv")
  arms = [a for a in qat_study.arm_specs("conv")]
  runs, tuning = [], []
  seed0 = {a.name: 5.0 + i for i, a in enumerate(arms)}
  seed0["sgdt_freezing"] = 1.0  # the best TALR arm on seed 0
  seed0["sgd_freezing"] = 2.0  # the best remedy and baseline on seed 0
  for a in arms:
    chosen = a.start[1] if a.knob else None
    tried = ([{"value": v, "seed0": seed0[a.name] + (0 if v == chosen else 1)} for v in a.start]
             if a.knob else [{"value": None, "seed0": seed0[a.name]}])
    tuning.append({"arm": a.name, "bits": 2, "knob": a.knob, "chosen": chosen,
                   "interior": True if a.knob else None, "values": {}, "tried": tried})
    runs.append({"arm": a.name, "bits": 2, "seed": 0, "final": seed0[a.name],
                 "final_as_trained": seed0[a.name] + 1, "tuning_run": True})
    for seed in (1, 2, 3, 4):
      final = 4.0 + rng.normal()
      runs.append({"arm": a.name, "bits": 2, "seed": seed, "final": final,
                   "final_as_trained": final + rng.normal(), "tracking_error": 0.1,
                   "late_oscillation": 1e-3, "frozen_fraction": None, "r0": 0.01})
  tuning[0]["interior"] = False  # an edge: listed as a caveat
  return {"task": {"name": "conv"}, "runs": runs, "tuning": tuning}, role


def _t_interval(d):
  d = np.asarray(d)
  half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
  return d.mean(), (d.mean() - half, d.mean() + half)


def test_summary_recomputed_with_scipy():
  results, role = _synthetic_results()
  s = qat_study.summarize(results)
  finals = {(r["arm"], r["seed"]): r for r in results["runs"]}
  rows = {r["arm"]: r for r in s["rows"]}
  assert set(rows) == {a.name for a in qat_study.arm_specs("conv")}
  for arm, row in rows.items():
    mine = [finals[(arm, k)]["final"] for k in (1, 2, 3, 4)]
    assert row["seeds"] == [1, 2, 3, 4]  # not the tuning seed
    assert row["mean"] == pytest.approx(np.mean(mine))
    assert row["std"] == pytest.approx(np.std(mine, ddof=1))
    effect = [finals[(arm, k)]["final"] - finals[(arm, k)]["final_as_trained"] for k in (1, 2, 3, 4)]
    assert row["reestimation_effect"]["mean"] == pytest.approx(np.mean(effect))
    v = row["vs_best_baseline"]
    ref = "sgd_freezing" if arm != "sgd_freezing" else "sgd"  # picked on seed 0
    assert v["reference"] == ref
    mean, (low, high) = _t_interval([finals[(arm, k)]["final"] - finals[(ref, k)]["final"]
                                     for k in (1, 2, 3, 4)])
    assert v["mean"] == pytest.approx(mean) and v["ci95"] == pytest.approx([low, high])
    assert v["conclusion"] == ("better" if high < 0 else "worse" if low > 0
                               else "no detectable difference")
  comparisons = {(v["comparison"], v["arm"], v["reference"]) for v in s["verdicts"]}
  assert comparisons == {
      ("best TALR arm vs best remedy", "sgdt_freezing", "sgd_freezing"),
      ("best TALR arm vs best baseline", "sgdt_freezing", "sgd_freezing"),
      ("SGDT, measured R0 vs SGDT (tuned)", "sgdt_measured", "sgdt"),
      ("SGDT, default lambda vs SGDT (tuned)", "sgdt_default", "sgdt")}
  assert all(v["as_trained"] is not None for v in s["verdicts"])
  assert s["at_grid_edge"] == [{"bits": 2, "arm": "sgd", "chosen": 0.1}]


def test_a_subset_of_arms_summarizes_without_the_missing_ones():
  results, _ = _synthetic_results()
  keep = {"sgd", "sgdt"}
  results["runs"] = [r for r in results["runs"] if r["arm"] in keep]
  results["tuning"] = [t for t in results["tuning"] if t["arm"] in keep]
  s = qat_study.summarize(results)
  assert {r["arm"] for r in s["rows"]} == keep
  assert [(v["arm"], v["reference"]) for v in s["verdicts"]] == [("sgdt", "sgd")]


@pytest.mark.parametrize("steps, momentum", [(2000, 0.995), (560, 1 - 1 / 56), (10, 0.0),
                                             (7, 0.0)])
def test_freezing_momentum_averages_over_a_tenth_of_the_run_and_never_below_one_step(
    steps, momentum):
  assert _study_tasks.freeze_ema_momentum(steps) == pytest.approx(momentum)


# ---------------------------------------------------------------------------
# A tiny real study: every piece runs, the file recomputes, a rerun is identical.


def test_tiny_conv_study_writes_a_file_that_recomputes_and_reruns_identically(tmp_path):
  cfg = qat_study.StudyConfig(
      task="conv", bits=(2,), seeds=2, arms=("sgd", "sgd_freezing", "sgdt"),
      quick=True, conv=_study_tasks.ConvSettings(epochs=1, fp_epochs=1, bn_batches=2,
                                                 eval_every_epochs=1))
  task = qat_study.make_task(cfg)
  task.prepare()
  results = qat_study.study(cfg, task)
  results["machine"] = qat_study.machine()
  path = qat_study._write(results, tmp_path, "conv_quick")  # pylint: disable=protected-access
  saved = json.loads(Path(path).read_text())
  assert {f.split("_")[-1] for f in saved["figures"]} == {"paired.png", "tuning.png",
                                                         "tracking.png"}
  tuned = [t for t in saved["tuning"] if t["knob"]]
  assert all(len(t["tried"]) == 2 for t in tuned)  # quick: two values, no extension
  assert {r["arm"] for r in saved["summary"]["rows"]} == set(cfg.arms)
  for r in saved["runs"]:
    assert math.isfinite(r["final"]) and math.isfinite(r["final_as_trained"])
    assert (r["frozen_fraction"] is not None) == r["arm"].endswith("freezing")
  again = qat_study.resummarize(path, tmp_path / "again")
  assert again["summary"] == saved["summary"]
  one = next(r for r in saved["runs"] if r["arm"] == "sgdt" and r["seed"] == 1)
  rerun = task.run(_study_tasks.Arm("sgd", talr=True), 2, 1, one["values"])
  assert rerun["final"] == one["final"] and rerun["final_as_trained"] == one["final_as_trained"]
