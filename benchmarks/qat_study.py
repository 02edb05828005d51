"""When TALR wins: the remedies as their authors run them, every arm tuned in a bracket.

Two tasks (``--task lm`` and ``--task conv``, see ``_study_tasks.py``): the
demo's byte-level transformer with AdamW (validation bits per byte), and the
demo's ``MobileNetV2Tiny`` with batch norm and depthwise convolutions, weights
and activations quantized, with SGD on digits (test error in percent after
batch-norm re-estimation, and as trained). The arms on the quantized weights
(everything else keeps the task's own optimizer):

=======================  ==========================================  ==============
arm                      quantized weights                           knob (tuned)
=======================  ==========================================  ==============
``B``                    the task's optimizer ``B`` (AdamW or SGD)    learning rate
``B_dampening``          ``B`` + dampening (warm start, cosine 0 to   final strength
                         its final strength, ``kernel_mean`` units)
``B_freezing``           ``B`` + freezing (warm start, cosine 0.1 to  final threshold
                         its final threshold)
``T``                    TALR (AdamWT or SGDT), ``R_0 = lambda        lambda
                         sqrt(bits)``
``T_freezing``           TALR + freezing                              final threshold
``T_measured``           TALR with a measured ``R_0`` (no knob)       --
``T_default``            TALR with the paper's lambda 5e-3            --
``full_precision`` (lm)  the model trained on at full precision        learning rate
=======================  ==========================================  ==============

Procedure. One full-precision model is pretrained (seed 0); every run starts
from it. Per bit width, each arm tunes its knob on the tuning seed 0 on a
log grid: three values first, then the grid is extended past its best end,
one value at a time, until the best value is interior (both neighbours tried
and worse, a diverged run counting as worse) or the arm has used its
``MAX_TUNING_RUNS`` runs. The remedies and every TALR arm run at ``B``'s
chosen learning rate (TALR's base rate ``U_0``), ``T_freezing`` at ``T``'s
chosen lambda. Then every arm runs with its chosen values on the evaluation
seeds 1..``seeds``, which differ from the tuning seed. A seed fixes the
calibration batch and the data order, the same for every arm, so
differences are paired seed by seed.

The verdicts use only paired 95 % t-intervals over the evaluation seeds, and
the arms they compare are picked on the tuning seed (so the evaluation seeds
are not used twice): the best TALR arm against the best remedy, the best
TALR arm against the best baseline, and TALR untuned (measured ``R_0``, the
paper's default lambda) against TALR tuned.

Usage (from the repository root)::

  python benchmarks/qat_study.py --task lm      # W2; about 75 minutes on 2 cores
  python benchmarks/qat_study.py --task conv    # W2A2, W3A3, W4A4; about 60 minutes
  python benchmarks/qat_study.py --task conv --quick   # a smoke run (a minute or two)
  python benchmarks/qat_study.py --task lm --rules     # the measured-R_0 rules, seed 0
  python benchmarks/qat_study.py --from-results benchmarks/results/qat_study/lm.json
                                  # summary and figures again, from the runs

Writes ``<task>.json`` (``<task>_quick.json`` with ``--quick``,
``<task>_rules.json`` with ``--rules``) and figures to ``--out`` (default
``benchmarks/results/qat_study``). Every flag is checked before any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402
import _stats  # noqa: E402
import _study_tasks as T  # noqa: E402

DEFAULT_OUT = os.path.join(_harness.RESULTS_DIR, "qat_study")
MAX_TUNING_RUNS = 6
TRACE_EVERY = 10  # per-step traces kept in the results every this many steps
FP_REFERENCE = "full_precision"
_ROOT3 = math.sqrt(10.0)


@dataclasses.dataclass(frozen=True)
class ArmSpec:
  """One arm of the study.

  Attributes:
    name: the arm's key in the results (``adamw_freezing``, ...).
    label: its display name.
    arm: the quantized optimizer (``None``: the full-precision reference).
    knob: the value it tunes (``"lr"``, ``"lam"``, ``"strength"``,
      ``"threshold"``), or ``None``.
    start: the first values tried on the tuning seed.
    factor: the grid's step: an extension multiplies or divides by it.
    needs: arms whose chosen values it runs with, in the form
      ``(arm name, value name)``.
    fixed: values it runs with that are not tuned.
    upper: the largest value its knob may take.
  """

  name: str
  label: str
  arm: Optional[T.Arm]
  knob: Optional[str]
  start: tuple[float, ...] = ()
  factor: float = 2.0
  needs: tuple[tuple[str, str], ...] = ()
  fixed: tuple[tuple[str, float], ...] = ()
  upper: float = math.inf


def arm_specs(task: str) -> tuple[ArmSpec, ...]:
  """The arms of ``task``, each after the arms it needs."""
  if task == "lm":
    b, t, bl, tl = "adamw", "adamwt", "AdamW", "AdamWT"
    lrs, lams, thresholds = (3e-4, 1e-3, 3e-3), (1.25e-3, 2.5e-3, 5e-3), (0.01, 0.02, 0.04)
  else:
    b, t, bl, tl = "sgd", "sgdt", "SGD", "SGDT"
    lrs, lams, thresholds = (0.03, 0.1, 0.3), (2.5e-3, 5e-3, 1e-2), (0.02, 0.04, 0.08)
  lr, lam = ((b, "lr"),), ((b, "lr"), (t, "lam"))
  specs = [
      ArmSpec(b, bl, T.Arm(b), "lr", lrs, _ROOT3),
      ArmSpec(f"{b}_dampening", f"{bl} + dampening", T.Arm(b, remedy="dampening"),
              "strength", (0.0316, 0.1, 0.316), _ROOT3, lr),
      ArmSpec(f"{b}_freezing", f"{bl} + freezing", T.Arm(b, remedy="freezing"), "threshold",
              thresholds, 2.0, lr, upper=1.0),
      ArmSpec(t, tl, T.Arm(b, talr=True), "lam", lams, 2.0, lr, upper=0.3),
      ArmSpec(f"{t}_freezing", f"{tl} + freezing", T.Arm(b, talr=True, remedy="freezing"),
              "threshold", thresholds, 2.0, lam, upper=1.0),
      ArmSpec(f"{t}_measured", f"{tl}, measured R0", T.Arm(b, talr=True,
                                                            target=T.MEASURED_RULE), None,
              needs=lr),
      ArmSpec(f"{t}_default", f"{tl}, default lambda", T.Arm(b, talr=True), None, needs=lr,
              fixed=(("lam", T.DEFAULT_LAMBDA),)),
  ]
  if task == "lm":
    specs.insert(0, ArmSpec(FP_REFERENCE, "full precision", None, "lr", (1e-3, 3e-3, 1e-2),
                            _ROOT3))
  return tuple(specs)


def roles(task: str) -> dict[str, tuple[str, ...]]:
  """Which arms are baselines, remedies and TALR arms."""
  names = [a.name for a in arm_specs(task)]
  talr_arms = tuple(a.name for a in arm_specs(task) if a.arm is not None and a.arm.talr)
  baselines = tuple(n for n in names if n != FP_REFERENCE and n not in talr_arms)
  return {"baselines": baselines, "remedies": baselines[1:], "talr": talr_arms,
          "base": (baselines[0],), "tuned_talr": (talr_arms[0],)}


# Values a run gets for what its arm does not use: valid, and never read.
_UNUSED = {"lr": 1e-3, "lam": T.DEFAULT_LAMBDA, "strength": 0.0, "threshold": 0.01}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything the study's runs depend on but the tuned values (in the results).

  Attributes:
    task: ``"lm"`` or ``"conv"``.
    bits: weight bit widths (and activation bits for conv).
    seeds: evaluation seeds 1..seeds (seed 0 tunes).
    arms: the arms run.
    quick: the smoke settings.
    lm, conv: the task's settings.
  """

  task: str = "lm"
  bits: tuple[int, ...] = (2,)
  seeds: int = 12
  arms: tuple[str, ...] = ()
  quick: bool = False
  lm: T.LMSettings = T.LMSettings()
  conv: T.ConvSettings = T.ConvSettings()

  def specs(self) -> tuple[ArmSpec, ...]:
    """The arms run, in order; in quick mode with shorter grids."""
    out = tuple(a for a in arm_specs(self.task) if a.name in self.arms)
    if self.quick:
      out = tuple(dataclasses.replace(a, start=a.start[::2]) for a in out)
    return out

  @property
  def max_tuning_runs(self) -> int:
    return 2 if self.quick else MAX_TUNING_RUNS


DEFAULTS = {"lm": dict(bits=(2,), seeds=12), "conv": dict(bits=(2, 3, 4), seeds=16)}
QUICK = {"lm": dict(bits=(2,), seeds=2, quick=True, lm=T.LMSettings(
             steps=60, fp_steps=100, width=32, layers=1, context=32, batch_size=8,
             eval_every=30, eval_windows=32)),
         "conv": dict(bits=(2,), seeds=2, quick=True, conv=T.ConvSettings(
             epochs=2, fp_epochs=1, bn_batches=5, eval_every_epochs=1))}


def make_task(cfg: StudyConfig) -> Any:
  return T.LMTask(cfg.lm) if cfg.task == "lm" else T.ConvTask(cfg.conv)


# ---------------------------------------------------------------------------
# Runs and tuning.


def _values(spec: ArmSpec, chosen: dict[str, dict[str, float]], knob_value: Optional[float]
            ) -> dict[str, float]:
  values = dict(_UNUSED)
  for arm, name in spec.needs:
    values[name] = chosen[arm][name]
  values.update(dict(spec.fixed))
  if spec.knob is not None:
    values[spec.knob] = knob_value
  return values


def _record(task: Any, spec: ArmSpec, bits: Optional[int], seed: int, values: dict[str, float],
            out: dict[str, Any]) -> dict[str, Any]:
  """A run's entry of the results: scores, tracking, oscillation, frozen fraction, traces."""
  from talr_optax.demo import runner  # pylint: disable=import-outside-toplevel
  trace = out.pop("trace")
  record = {"arm": spec.name, "bits": bits, "seed": seed, "values": values, **out}
  if spec.arm is None:
    return record | {"r0": None, "tracking_error": None, "late_oscillation": None,
                     "frozen_fraction": None,
                     "trace": {"loss": trace["loss"][::TRACE_EVERY]}}
  steps = len(trace["loss"])
  if "R" in trace and spec.arm.target in T.RULES:  # R_0 as measured (mean over groups)
    w = T.talr.measured_target(steps).measure_steps
    r0 = trace["R"][w - 1] / float(T.optax.cosine_decay_schedule(1.0, steps)(w))
  else:
    r0 = values["lam"] * math.sqrt(bits) if spec.arm.talr else T.DEFAULT_LAMBDA * math.sqrt(bits)
  if "R" not in trace:  # a baseline: its K against the default target; entry n after update n
    default = T.target_schedule(T.Arm(spec.arm.base, talr=True), bits, steps, T.DEFAULT_LAMBDA)
    trace["R"] = np.asarray(default(np.arange(1, steps + 1))).tolist()
  finite = all(math.isfinite(x) for x in trace["loss"])
  return record | {
      "r0": r0,
      "tracking_error": runner.tracking_error(trace, r0) if finite else None,
      "late_oscillation": runner.late_oscillation_frequency(trace) if finite else None,
      "frozen_fraction": trace["frozen"][-1] if "frozen" in trace else None,
      "trace": {k: v[::TRACE_EVERY] for k, v in trace.items()
                if k in ("loss", "K", "R", "osc", "frozen")},
  }


def _score(x: Optional[float]) -> float:
  """A run's score for choosing: a diverged run (NaN) is worse than any other."""
  return math.inf if x is None or not math.isfinite(x) else x


def bracket(start: Sequence[float], factor: float, upper: float, max_runs: int,
            score_at: Callable[[float], float]) -> tuple[float, dict[float, float], bool]:
  """Tunes one knob: the start grid, then extensions past its best end.

  Args:
    start: the first values (ascending).
    factor: an extension multiplies the largest value or divides the smallest by it.
    upper: the largest value allowed.
    max_runs: the most values tried.
    score_at: ``value -> score`` (lower is better; NaN: diverged).

  Returns:
    ``(chosen, {value: score}, interior)``: ``interior`` when both of the
    chosen value's neighbours were tried (and are worse).
  """
  tried = {v: score_at(v) for v in start}
  middle = start[len(start) // 2]
  while True:
    values = sorted(tried)
    # Ties (e.g. a remedy that never acts) go to the value nearest the grid's middle.
    best = min(values, key=lambda v: (_score(tried[v]), abs(math.log(v / middle))))
    if values[0] < best < values[-1]:
      return best, tried, True
    if len(tried) >= max_runs:
      return best, tried, False
    nxt = best / factor if best == values[0] else best * factor
    if nxt > upper:
      return best, tried, False
    tried[nxt] = score_at(nxt)


def study(cfg: StudyConfig, task: Any) -> dict[str, Any]:
  """Runs the study on a prepared task; returns the results (without ``machine``)."""
  start = time.perf_counter()
  runs, tuning = [], []
  eval_seeds = list(range(1, cfg.seeds + 1))
  for bits in (None, *cfg.bits):
    chosen: dict[str, dict[str, float]] = {}
    for spec in cfg.specs():
      if (bits is None) != (spec.arm is None):
        continue

      def train(seed, value, spec=spec, chosen=chosen, bits=bits):
        values = _values(spec, chosen, value)
        record = _record(task, spec, bits, seed, values, task.run(spec.arm, bits, seed, values))
        return record

      seed0: dict[float, dict[str, Any]] = {}

      def score_at(value, train=train, seed0=seed0):
        seed0[value] = train(0, value)
        return seed0[value]["final"]

      if spec.knob is None:
        value, interior = None, None
        score_at(None)
      else:
        value, _, interior = bracket(spec.start, spec.factor, spec.upper, cfg.max_tuning_runs,
                                     score_at)
      chosen[spec.name] = _values(spec, chosen, value)
      width = "fp" if bits is None else f"W{bits}"
      for v, r in seed0.items():
        print(f"  tune {width} {spec.label} {spec.knob}={v}: {r['final']:.4f}"
              + (" (chosen)" if v == value else ""), flush=True)
      tuning.append({"arm": spec.name, "bits": bits, "knob": spec.knob, "chosen": value,
                     "interior": interior, "values": chosen[spec.name],
                     "tried": [{"value": v, "seed0": r["final"]} for v, r in
                               sorted(seed0.items(), key=lambda x: (x[0] is not None, x[0] or 0))]})
      runs += [dict({k: v for k, v in r.items() if k != "trace"}, tuning_run=True)
               for r in seed0.values()]
      mine = [train(s, value) for s in eval_seeds]
      runs += mine
      print(f"{width} {spec.label}: {np.mean([r['final'] for r in mine]):.4f} over seeds "
            f"{eval_seeds} ({time.perf_counter() - start:.0f} s)", flush=True)
  return {
      "config": dataclasses.asdict(cfg),
      "task": {"name": task.name, "metric": task.metric, "metric_label": task.metric_label,
               "steps": task.steps, **task.facts()},
      "arms": [dataclasses.asdict(a) for a in cfg.specs()],
      "settings": {"freeze_ema_momentum": T.freeze_ema_momentum(task.steps),
                   "freeze_initial_threshold": T.FREEZE_INITIAL_THRESHOLD,
                   "anneal_start": T.ANNEAL_START, "dampening_aggregation": "kernel_mean",
                   "talr_ema_momentum": T.talr.ema_momentum_for(task.steps),
                   "measured_rule": T.MEASURED_RULE,
                   "measure_steps": T.talr.measured_target(task.steps).measure_steps,
                   "max_tuning_runs": cfg.max_tuning_runs},
      "pretraining": task.pretraining,
      "tuning": tuning,
      "runs": runs,
      "seconds": time.perf_counter() - start,
  }


def rules(cfg: StudyConfig, task: Any) -> dict[str, Any]:
  """The measured-R_0 rules on the tuning seed, at the base arm's tuned learning rate."""
  start = time.perf_counter()
  base = arm_specs(cfg.task)[1 if cfg.task == "lm" else 0]
  rows = []
  for bits in cfg.bits:
    scores: dict[float, float] = {}

    def score_at(value, bits=bits, scores=scores):
      values = dict(_UNUSED, lr=value)
      scores[value] = task.run(base.arm, bits, 0, values)["final"]
      return scores[value]

    lr, _, interior = bracket(base.start if not cfg.quick else base.start[::2], base.factor,
                              base.upper, cfg.max_tuning_runs, score_at)
    row = {"bits": bits, "base_lr": lr, "base_lr_interior": interior,
           "base_tried": [{"value": v, "seed0": s} for v, s in sorted(scores.items())],
           "base_seed0": scores[lr], "rules": {}}
    for rule in T.RULES:
      arm = T.Arm(base.arm.base, talr=True, target=rule)
      out = task.run(arm, bits, 0, dict(_UNUSED, lr=lr))
      rec = _record(task, ArmSpec(rule, rule, arm, None), bits, 0, dict(_UNUSED, lr=lr), out)
      row["rules"][rule] = {"seed0": rec["final"], "r0": rec["r0"],
                            "tracking_error": rec["tracking_error"]}
      print(f"W{bits} rule {rule}: {rec['final']:.4f} (R0 {rec['r0']:.2e}; base "
            f"{scores[lr]:.4f} at lr {lr:g})", flush=True)
    rows.append(row)
  return {"config": dataclasses.asdict(cfg), "rules": {k: v for k, v in T.RULES.items()},
          "task": {"name": task.name, "metric": task.metric, "steps": task.steps},
          "rows": rows, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------
# The summary: a function of the runs alone.


def _paired(runs: list[dict[str, Any]], bits: int, arm: str, ref: str, key: str = "final"
            ) -> Optional[dict[str, Any]]:
  """``arm`` minus ``ref`` at ``bits`` over the evaluation seeds: interval and conclusion."""
  def finals(name):
    return {r["seed"]: r[key] for r in runs if r["bits"] == bits and r["arm"] == name
            and not r.get("tuning_run")}
  mine, theirs = finals(arm), finals(ref)
  diffs = [mine[s] - theirs[s] for s in sorted(mine) if s in theirs]
  if len(diffs) < 2 or not all(math.isfinite(d) for d in diffs):
    return None
  p = _stats.paired_interval(diffs)
  return {"arm": arm, "reference": ref, "mean": p["mean"], "ci95": p["ci"],
          "conclusion": _stats.conclusion(p["ci"]), "lower_on": p["lower_on"], "n": p["n"]}


def _seed0(tuning: list[dict[str, Any]], bits: int, arm: str) -> float:
  t = next(t for t in tuning if t["bits"] == bits and t["arm"] == arm)
  return _score(next(x["seed0"] for x in t["tried"] if x["value"] == t["chosen"]))


def summarize(results: dict[str, Any]) -> dict[str, Any]:
  """Rows per (bits, arm) and the verdicts, from ``results["runs"]`` and ``["tuning"]``."""
  task, runs, tuning = results["task"]["name"], results["runs"], results["tuning"]
  role = roles(task)
  labels = {a.name: a.label for a in arm_specs(task)}
  conv = task == "conv"
  rows, verdicts = [], []
  for t in tuning:
    bits, arm = t["bits"], t["arm"]
    sel = sorted((r for r in runs if r["bits"] == bits and r["arm"] == arm
                  and not r.get("tuning_run")), key=lambda r: r["seed"])
    if not sel:
      continue
    finals = [r["final"] for r in sel]
    mean_of = lambda key: (None if any(r.get(key) is None for r in sel)
                           else float(np.mean([r[key] for r in sel])))
    row = {"bits": bits, "arm": arm, "label": labels[arm], "seeds": [r["seed"] for r in sel],
           "mean": float(np.mean(finals)),
           "std": float(np.std(finals, ddof=1)) if len(sel) > 1 else 0.0,
           "per_seed": finals, "knob": t["knob"], "chosen": t["chosen"],
           "interior": t["interior"], "values": t["values"],
           "tried": t["tried"], "tracking_error": mean_of("tracking_error"),
           "late_oscillation": mean_of("late_oscillation"),
           "frozen_fraction": mean_of("frozen_fraction"), "r0": mean_of("r0")}
    if conv:
      row["mean_as_trained"] = mean_of("final_as_trained")
      row["reestimation_effect"] = None
      diffs = [r["final"] - r["final_as_trained"] for r in sel]
      if len(diffs) > 1 and all(math.isfinite(d) for d in diffs):
        p = _stats.paired_interval(diffs)
        row["reestimation_effect"] = {"mean": p["mean"], "ci95": p["ci"],
                                      "conclusion": _stats.conclusion(p["ci"])}
    rows.append(row)
  for bits in sorted({r["bits"] for r in rows if r["bits"] is not None}):
    present = {r["arm"] for r in rows if r["bits"] == bits}
    pick = lambda names: min((n for n in names if n in present),
                             key=lambda n: _seed0(tuning, bits, n), default=None)
    best = {"baseline": pick(role["baselines"]), "remedy": pick(role["remedies"]),
            "talr": pick(role["talr"])}
    for row in (r for r in rows if r["bits"] == bits):
      ref = best["baseline"] if row["arm"] != best["baseline"] else pick(
          [n for n in role["baselines"] if n != row["arm"]])
      row["vs_best_baseline"] = None if ref is None else _paired(runs, bits, row["arm"], ref)
      base = role["base"][0]
      row["vs_base"] = (None if row["arm"] == base or base not in present
                        else _paired(runs, bits, row["arm"], base))
    pairs = [("best TALR arm vs best remedy", best["talr"], best["remedy"]),
             ("best TALR arm vs best baseline", best["talr"], best["baseline"])]
    tuned = role["tuned_talr"][0]
    for untuned in role["talr"][2:]:
      pairs.append((f"{labels[untuned]} vs {labels[tuned]} (tuned)", untuned, tuned))
    for what, arm, ref in pairs:
      if arm is None or ref is None or arm == ref:
        continue
      v = _paired(runs, bits, arm, ref)
      if v is None:
        continue
      v = v | {"bits": bits, "comparison": what}
      if conv:
        v["as_trained"] = _paired(runs, bits, arm, ref, key="final_as_trained")
      verdicts.append(v)
  edges = [{"bits": r["bits"], "arm": r["arm"], "chosen": r["chosen"]} for r in rows
           if r["interior"] is False]
  return {"rows": rows, "verdicts": verdicts, "at_grid_edge": edges}


# ---------------------------------------------------------------------------
# Output.


def _fmt_value(x: Optional[float]) -> str:
  return "" if x is None else f"{x:.3g}"


def print_summary(results: dict[str, Any]) -> None:
  s = results["summary"]
  conv = results["task"]["name"] == "conv"
  fmt = lambda x, f: "" if x is None else format(x, f)
  header = ["bits", "arm", "tuned", "interior", "mean ± std", "vs best baseline"]
  if conv:
    header.insert(5, "as trained")
  table = []
  for r in s["rows"]:
    v = r.get("vs_best_baseline")
    cells = [f"W{r['bits']}" if r["bits"] else "fp", r["label"],
             f"{r['knob']} {_fmt_value(r['chosen'])}" if r["knob"] else "",
             {True: "yes", False: "NO", None: ""}[r["interior"]],
             f"{r['mean']:.4f} ± {r['std']:.4f}",
             "" if v is None else f"{v['mean']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] "
             f"vs {v['reference']}: {v['conclusion']}"]
    if conv:
      cells.insert(5, fmt(r.get("mean_as_trained"), ".2f"))
    table.append(cells)
  _harness.print_table(f"QAT study, {results['task']['name']}: {results['task']['metric_label']}",
                       header, table)
  for v in s["verdicts"]:
    print(f"W{v['bits']} {v['comparison']}: {v['arm']} - {v['reference']} = {v['mean']:+.4f} "
          f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]: {v['conclusion']}")
  for e in s["at_grid_edge"]:
    print(f"caveat: W{e['bits']} {e['arm']}: chosen value {e['chosen']} is at an end of its grid")


def plot(results: dict[str, Any], out: Path, stem: str) -> list[str]:
  """Three figures: paired differences, tuning curves, and K against R."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  s, metric = results["summary"], results["task"]["metric_label"]
  bits = sorted({r["bits"] for r in s["rows"] if r["bits"] is not None})
  paths = []

  def save(fig, name):
    fig.tight_layout()
    paths.append(str(out / f"{stem}_{name}.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

  fig, axes = plt.subplots(1, len(bits), figsize=(5.5 * len(bits), 3.4), squeeze=False)
  for ax, b in zip(axes[0], bits):
    sel = [r for r in s["rows"] if r["bits"] == b and r.get("vs_best_baseline")]
    y = np.arange(len(sel))
    mean = np.array([r["vs_best_baseline"]["mean"] for r in sel])
    ci = np.array([r["vs_best_baseline"]["ci95"] for r in sel]).reshape(-1, 2)
    ax.errorbar(mean, y, xerr=[mean - ci[:, 0], ci[:, 1] - mean], fmt="o", capsize=3)
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set_yticks(y, [f"{r['label']} (vs {r['vs_best_baseline']['reference']})" for r in sel],
                  fontsize=7)
    ax.set_xlabel("minus the best baseline (95 % CI)")
    ax.set_title(f"W{b}")
  save(fig, "paired")
  tuned = [r for r in s["rows"] if r["knob"]]
  by_arm: dict[str, list[dict[str, Any]]] = {}
  for r in tuned:
    by_arm.setdefault(r["arm"], []).append(r)
  fig, axes = plt.subplots(1, len(by_arm), figsize=(3.0 * len(by_arm), 2.9), squeeze=False)
  for ax, (arm, sel) in zip(axes[0], by_arm.items()):
    for r in sel:
      xs = [t["value"] for t in r["tried"]]
      ys = [t["seed0"] if t["seed0"] is not None and math.isfinite(t["seed0"]) else np.nan
            for t in r["tried"]]
      line, = ax.plot(xs, ys, "o-", ms=3, label=f"W{r['bits']}" if r["bits"] else "fp")
      ax.plot([r["chosen"]], [dict(zip(xs, ys))[r["chosen"]]], "*", ms=10,
              color=line.get_color())
    ax.set_xscale("log")
    values = sorted({t["value"] for r in sel for t in r["tried"]})
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(values, [f"{v:.3g}" for v in values], fontsize=6, rotation=45)
    ax.set_title(sel[0]["label"], fontsize=8)
    ax.set_xlabel(sel[0]["knob"], fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=6)
  axes[0][0].set_ylabel(f"seed 0: {results['task']['metric']}", fontsize=8)
  save(fig, "tuning")
  role = roles(results["task"]["name"])
  fig, axes = plt.subplots(1, len(bits), figsize=(5.5 * len(bits), 3.2), squeeze=False)
  for ax, b in zip(axes[0], bits):
    for arm in (role["base"][0], role["remedies"][-1], role["talr"][0], role["talr"][2]):
      sel = [r for r in results["runs"] if r["bits"] == b and r["arm"] == arm
             and not r.get("tuning_run") and "trace" in r]
      if not sel:
        continue
      K = np.mean([np.asarray(r["trace"]["K"]) for r in sel], axis=0)
      steps = np.arange(len(K)) * TRACE_EVERY
      ax.plot(steps, K, label=f"K {arm}")
      if arm == role["talr"][0]:
        ax.plot(steps, np.mean([np.asarray(r["trace"]["R"]) for r in sel], axis=0), "k--",
                lw=0.8, label=f"R of {arm}")
    ax.set_xlabel("QAT step")
    ax.set_ylabel("transitions per weight per step")
    ax.set_title(f"W{b}: K (mean of seeds)")
    ax.legend(fontsize=6)
  save(fig, "tracking")
  return paths


def _write(results: dict[str, Any], out: Path, stem: str) -> str:
  out.mkdir(parents=True, exist_ok=True)
  results["summary"] = summarize(results)
  results["figures"] = [os.path.basename(p) for p in plot(results, out, stem)]
  print_summary(results)
  path = str(out / f"{stem}.json")
  _harness.write_json(path, results)
  return path


def resummarize(path: str, out: Path) -> dict[str, Any]:
  """The summary and figures of a results file again, from its runs (no training)."""
  with open(path) as f:
    results = json.load(f)
  _write(results, out, Path(path).stem)
  return results


# ---------------------------------------------------------------------------
# Command line: every flag is checked before any training.


_TRAINING_FLAGS = ("quick", "arms", "bits", "seeds", "width", "rules")


def _parse(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, Optional[StudyConfig]]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--task", choices=("lm", "conv"), default="lm", help="the task (default lm)")
  ap.add_argument("--quick", action="store_true", help="small model, short runs (smoke run)")
  ap.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
  ap.add_argument("--arms", default=None, help="comma-separated arms (default all)")
  ap.add_argument("--bits", default=None, help="comma-separated bit widths (lm default 2; "
                  "conv default 2,3,4)")
  ap.add_argument("--seeds", type=int, default=None,
                  help="evaluation seeds, >= 2 (lm default 12; conv default 16)")
  ap.add_argument("--width", type=int, default=None,
                  help="lm model width, even, in [2, 512] (default 80)")
  ap.add_argument("--rules", action="store_true",
                  help="only the measured-R0 rules, on the tuning seed")
  ap.add_argument("--from-results", default=None, metavar="FILE",
                  help="no training: the summary and figures of FILE again, from its runs")
  args = ap.parse_args(argv)
  if args.from_results is not None:
    given = [f"--{f.replace('_', '-')}" for f in _TRAINING_FLAGS
             if getattr(args, f) not in (None, False)]
    if given:
      ap.error(f"--from-results trains nothing: {', '.join(given)} would be ignored; drop them")
    try:
      with open(args.from_results) as f:
        keys = set(json.load(f))
    except (OSError, ValueError) as e:
      ap.error(f"--from-results: cannot read a results file from {args.from_results!r}: {e}")
    if not {"runs", "tuning", "task"} <= keys:
      ap.error(f"--from-results: {args.from_results!r} has no 'runs', 'tuning' and 'task': "
               "not a results file of this script")
    _check_out(ap, args.out)
    return args, None
  values: dict[str, Any] = dict(task=args.task, **DEFAULTS[args.task])
  if args.quick:
    values.update(QUICK[args.task])
  names = [a.name for a in arm_specs(args.task)]
  arms = names if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
  unknown = [a for a in arms if a not in names]
  if unknown or not arms:
    ap.error(f"--arms: unknown {unknown or arms} for --task {args.task}; choose from {names}")
  specs = {a.name: a for a in arm_specs(args.task)}
  for a in arms:
    missing = [n for n, _ in specs[a].needs if n not in arms]
    if missing:
      ap.error(f"--arms: {a} runs with the tuned values of {sorted(set(missing))}: add "
               f"{'them' if len(set(missing)) > 1 else 'it'} to --arms")
  values["arms"] = tuple(n for n in names if n in arms)
  if args.bits is not None:
    try:
      bits = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
      bits = ()
    if not bits or any(b not in (1, 2, 3, 4, 8) for b in bits):
      ap.error(f"--bits must be comma-separated widths in {{1, 2, 3, 4, 8}}, got {args.bits!r}")
    values["bits"] = bits
  if args.seeds is not None:
    if args.seeds < 2:
      ap.error(f"--seeds must be an int >= 2 (a paired interval needs two), got {args.seeds}")
    values["seeds"] = args.seeds
  if args.width is not None:
    if args.task != "lm":
      ap.error("--width is the lm model's width; --task conv has a fixed model")
    if not (2 <= args.width <= 512 and args.width % 2 == 0):
      ap.error(f"--width must be an even int in [2, 512] (heads: 2), got {args.width}")
    values["lm"] = dataclasses.replace(values.get("lm", T.LMSettings()), width=args.width)
  _check_out(ap, args.out)
  return args, StudyConfig(**values)


def _check_out(ap: argparse.ArgumentParser, out: str) -> None:
  """The output directory can be written, before hours of training."""
  try:
    Path(out).mkdir(parents=True, exist_ok=True)
    probe = Path(out) / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    ap.error(f"--out: cannot write to {out!r}: {e}")


def machine() -> dict[str, Any]:
  """CPU and its ISA extensions, cores, versions, XLA flags, load (before training)."""
  import flax  # pylint: disable=import-outside-toplevel
  return _harness.meta(sys.argv[1:], flax=flax.__version__, cpu_isa=_harness.cpu_isa(),
                       onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA"),
                       load_average=_harness.loadavg())


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Command line (see the module docstring)."""
  args, cfg = _parse(argv)
  if cfg is None:
    return resummarize(args.from_results, Path(args.out))
  before = machine()  # the commit recorded is the one that ran, whatever lands meanwhile
  task = make_task(cfg)
  print(f"{cfg.task}: pretraining", flush=True)
  task.prepare()
  if args.rules:
    results = rules(cfg, task)
    results["machine"] = before | {"load_average_end": _harness.loadavg()}
    path = str(Path(args.out) / f"{cfg.task}_rules{'_quick' if cfg.quick else ''}.json")
    _harness.write_json(path, results)
    print(f"wrote {path} ({results['seconds']:.0f} s)")
    return results
  results = study(cfg, task)
  results["machine"] = before | {"load_average_end": _harness.loadavg()}
  path = _write(results, Path(args.out), cfg.task + ("_quick" if cfg.quick else ""))
  print(f"wrote {path} ({results['seconds']:.0f} s)")
  return results


if __name__ == "__main__":
  main()
