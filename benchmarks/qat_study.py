"""When TALR wins: AdamW, its oscillation remedies and AdamWT on the language-model task.

The study trains the demo's byte-level transformer (``python -m talr_optax.demo
--task lm``: same data, model family, pretraining and training step, from
``talr_optax.demo.lm_*``) at a larger size, with these arms on the quantized
kernels (everything else: AdamW with the cosine learning rate ``lr``):

============================  ====================================  =====================
arm                           optimizer of the quantized kernels    its one knob (tuned)
============================  ====================================  =====================
``adamw``                     AdamW, cosine learning rate            peak learning rate
``adamw_dampening``           AdamW + oscillation dampening          ``lambda``
``adamw_freezing``            AdamW + iterative freezing             threshold
``adamwt``                    AdamWT, default EMA momentum           ``lambda`` of ``R_0``
``adamwt_freezing``           AdamWT + iterative freezing            threshold
============================  ====================================  =====================

Procedure. One full-precision model is pretrained (seed 0); every run starts
from it. Per bit width, each arm tries each value of its knob on the tuning
seed 0 and keeps the one with the lowest final validation bits per byte
(the remedies run at AdamW's chosen learning rate, AdamWT + freezing at
AdamWT's chosen ``lambda``). Then every arm runs with its chosen value on
the evaluation seeds 1..``seeds``, which differ from the tuning seed, so no
arm's reported runs include the run it was picked on. A seed fixes the
calibration batch and the training data order, the same for every arm, so
differences are paired seed by seed.

The full-precision reference continues the pretrained model for as many
steps as QAT at full precision (its learning rate tuned the same way): it
has been trained as long as pretraining plus QAT, so a QAT arm's distance
to it is the cost of quantization, not of shorter training.

Each summary row of ``results.json`` holds, per (task, bits, arm), the mean
and std over the evaluation seeds, the paired difference to the best
baseline (the non-TALR arm with the lowest mean) with its 95 % t-interval
and the conclusion drawn from that interval only, the same against plain
AdamW (``*_vs_adamw``, the optimizer the others add to), the tracking error
``|K - R| / R_0`` (baselines: their own ``K`` against the default target),
the late oscillation frequency, the final frozen fraction and the tuned
value.

Usage (from the repository root)::

  python benchmarks/qat_study.py            # the full study (W2, W3; 5 seeds)
  python benchmarks/qat_study.py --quick    # a small model, short runs: a smoke run
  python benchmarks/qat_study.py --from-results benchmarks/results/qat_study/results.json
                                            # summary and figures again, from the runs

Writes ``results.json`` (``quick.json`` with ``--quick``) and the figures to
``--out`` (default ``benchmarks/results/qat_study``).
"""

from __future__ import annotations

import os

# The kernels of XLA:CPU's matrix products depend on the CPU, and capping
# oneDNN's instruction set does not make two CPUs agree (docs/reproducibility.md):
# the study runs with the defaults and records the environment in ``machine``.
import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402
import _stats  # noqa: E402

import talr_optax as talr  # noqa: E402
from talr_optax import nnx as tnnx  # noqa: E402

TASK = "lm"
METRIC = "bits_per_byte"
WEIGHT_DECAY = 1e-4
DEFAULT_OUT = os.path.join(_harness.RESULTS_DIR, "qat_study")
# Momentum of the freezing's frequency EMA: 1 - m = 0.005 is at most half of
# every threshold tried (Nagel et al.'s advice), so one oscillation cannot
# freeze a weight.
FREEZE_EMA_MOMENTUM = 0.995
_TRACE_EVERY = 10  # per-step traces kept in results.json every this many steps


@dataclasses.dataclass(frozen=True)
class ArmSpec:
  """An arm: its knob, the values tried, and whose chosen value it builds on.

  Attributes:
    name: the arm's key in ``results.json``.
    label: its display name.
    knob: what its tuning varies.
    values: the values tried on the tuning seed.
    base: the arm whose chosen value is this arm's second input (``None``).
    talr: whether the quantized kernels move by TALR.
    remedy: ``None``, ``"dampening"`` or ``"freezing"``.
  """

  name: str
  label: str
  knob: str
  values: tuple[float, ...]
  base: Optional[str] = None
  talr: bool = False
  remedy: Optional[str] = None


FP_REFERENCE = "full_precision"


def arm_specs(quick: bool = False) -> tuple[ArmSpec, ...]:
  """The arms in tuning order (an arm's ``base`` comes before it)."""
  pick = (lambda v: v[::2][:2]) if quick else (lambda v: v)
  # A first full run chose 1e-3, the lowest of (1e-3, 3e-3, 1e-2), for AdamW and for the
  # full-precision reference: the grid starts lower.
  lrs = pick((3e-4, 1e-3, 3e-3))
  thresholds = pick((0.01, 0.02, 0.04))
  return (
      ArmSpec(FP_REFERENCE, "full precision", "learning_rate", lrs),
      ArmSpec("adamw", "AdamW", "learning_rate", lrs),
      ArmSpec("adamw_dampening", "AdamW + dampening", "lambda", pick((1e-3, 1e-2, 1e-1)),
              base="adamw", remedy="dampening"),
      ArmSpec("adamw_freezing", "AdamW + freezing", "threshold", thresholds,
              base="adamw", remedy="freezing"),
      ArmSpec("adamwt", "AdamWT", "target_lambda", pick((2.5e-3, 5e-3, 1e-2)), talr=True),
      ArmSpec("adamwt_freezing", "AdamWT + freezing", "threshold", thresholds,
              base="adamwt", talr=True, remedy="freezing"),
  )


BASELINES = ("adamw", "adamw_dampening", "adamw_freezing")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything the study depends on (written to ``results.json``).

  Attributes:
    bits: weight bit widths.
    seeds: evaluation seeds 1..seeds (seed 0 tunes).
    steps: QAT steps per run (and the reference's continued training).
    fp_steps: full-precision pretraining steps.
    width, layers, heads, context, batch_size: the model and its batches.
    lr: cosine learning rate of the full-precision parameters in QAT, and
      AdamWT's base rate ``U_0``.
    fp_lr: peak learning rate of the pretraining.
    eval_every: steps between validation evaluations.
    eval_windows: fixed validation windows.
    arms: the arms run (default all).
    quick: the smoke settings.
  """

  bits: tuple[int, ...] = (2, 3)
  seeds: int = 5
  steps: int = 2000
  fp_steps: int = 4000
  width: int = 80
  layers: int = 2
  heads: int = 2
  context: int = 64
  batch_size: int = 16
  lr: float = 3e-4
  fp_lr: float = 3e-3
  eval_every: int = 250
  eval_windows: int = 256
  arms: tuple[str, ...] = tuple(a.name for a in arm_specs())
  quick: bool = False

  def specs(self) -> tuple[ArmSpec, ...]:
    """The arms run, in tuning order."""
    return tuple(a for a in arm_specs(self.quick) if a.name in self.arms)


QUICK = dict(bits=(2,), seeds=2, steps=60, fp_steps=100, width=32, layers=1, context=32,
             batch_size=8, eval_every=30, eval_windows=32, quick=True)


# ---------------------------------------------------------------------------
# The demo's LM pieces (model, data, loss, evaluation, pretraining). All use
# of talr_optax.demo is in this section.


def _demo():
  from talr_optax.demo import lm_data, lm_train, runner  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.lm_config import LMConfig  # pylint: disable=import-outside-toplevel
  return lm_data, lm_train, runner, LMConfig


def lm_config(cfg: StudyConfig) -> Any:
  """The demo's ``LMConfig`` of the study's model, batches and pretraining."""
  LMConfig = _demo()[3]
  return LMConfig(bits=cfg.bits, seeds=cfg.seeds, steps=cfg.steps, fp_steps=cfg.fp_steps,
                  batch_size=cfg.batch_size, context=cfg.context, width=cfg.width,
                  layers=cfg.layers, heads=cfg.heads, lr=cfg.lr, fp_lr=cfg.fp_lr,
                  eval_every=cfg.eval_every, eval_windows=cfg.eval_windows)


def load_data(cfg: StudyConfig) -> Any:
  """The demo's data: the standard library's bytes and the fixed validation windows."""
  return _demo()[1].load(lm_config(cfg))


def pretrain(cfg: StudyConfig, data: Any) -> tuple[nnx.Module, dict]:
  """The demo's full-precision pretraining (seed 0)."""
  return _demo()[1].pretrain(lm_config(cfg), data, 0)


def make_model(cfg: StudyConfig, bits: Optional[int], seed: int) -> nnx.Module:
  return _demo()[1].make_model(lm_config(cfg), bits, seed)


def next_byte_loss(model: nnx.Module, windows: jax.Array) -> jax.Array:
  return _demo()[1].next_byte_loss(model, windows)


def bits_per_byte(model: nnx.Module, windows: np.ndarray) -> float:
  return _demo()[1].bits_per_byte(model, windows)


def windows_for(cfg: StudyConfig, data: Any, length: int, rng: np.random.Generator
                ) -> np.ndarray:
  return _demo()[0].random_windows(data.corpus.train, length, cfg.batch_size, rng)


def step_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """The demo's per-step means of k, K, R, U and the oscillation frequency."""
  return _demo()[2].step_metrics(opt_state)


def tracking_error(trace: dict[str, list[float]], r0: float) -> float:
  return _demo()[2].tracking_error(trace, r0)


def late_oscillation(trace: dict[str, list[float]]) -> float:
  return _demo()[2].late_oscillation_frequency(trace)


# ---------------------------------------------------------------------------
# Optimizers of the arms.


@dataclasses.dataclass(frozen=True)
class Run:
  """What a compiled step depends on (static); the knobs are traced inputs.

  Attributes:
    arm: the arm's name.
    bits: weight bits (``None``: the full-precision reference).
    steps: the run's length (the cosine schedules end there).
    lr: cosine learning rate of the full-precision parameters.
  """

  arm: str
  bits: Optional[int]
  steps: int
  lr: float


def _unit_cosine(steps: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(1.0, steps)


def target(run: Run, lam: Any) -> talr.TargetSchedule:
  """The cosine target from ``R_0 = lam sqrt(bits)`` (``lam`` may be traced)."""
  unit = _unit_cosine(run.steps)
  r0 = lam * math.sqrt(run.bits)
  return talr.TargetSchedule(lambda count: r0 * unit(count), run.steps)


def _dampening(centers_fn: Any, strength: Any) -> optax.GradientTransformation:
  """Oscillation dampening with a constant ``strength`` (a traced scalar: one compile)."""
  return talr.dampen_oscillations(centers_fn, lambda count: strength)


def _freezing(levels_fn: Any, centers_fn: Any, threshold: Any, axes: Any
              ) -> optax.GradientTransformation:
  """Iterative freezing at a constant (traced) threshold, after the learning rate."""
  return talr.freeze_oscillations(levels_fn, centers_fn, lambda count: threshold,
                                  ema_momentum=FREEZE_EMA_MOMENTUM, layer_axes=axes)


def optimizer(run: Run, model: nnx.Module, knob: Any, base: Any
              ) -> optax.GradientTransformation:
  """The optimizer of ``run`` for ``model`` (built inside the step from the traced model).

  Args:
    run: the run's settings.
    model: the model, possibly traced.
    knob: the arm's tuned value (a traced scalar).
    base: the chosen value of the arm's base arm (traced; unused without one).

  Returns:
    An ``optax`` transformation over ``nnx.state(model, nnx.Param)``.
  """
  unit = _unit_cosine(run.steps)
  full_precision = optax.adamw(lambda c: run.lr * unit(c), weight_decay=WEIGHT_DECAY)
  if run.arm == FP_REFERENCE:
    return optax.adamw(lambda c: knob * unit(c), weight_decay=WEIGHT_DECAY)
  levels_fn, axes = tnnx.levels_fn_for(model), tnnx.layer_axes_for(model)
  spec = {a.name: a for a in arm_specs()}[run.arm]
  if spec.talr:
    lam = knob if spec.base is None else base
    freeze = {} if spec.remedy is None else dict(
        freeze_threshold=lambda count: knob, centers_fn=tnnx.centers_fn_for(model),
        freeze_ema_momentum=FREEZE_EMA_MOMENTUM)
    quantized = talr.adamwt(lambda c: run.lr * unit(c), target(run, lam), levels_fn,
                            weight_decay=WEIGHT_DECAY, layer_axes=axes, **freeze)
  else:
    lr = knob if spec.base is None else base
    stages = [optax.scale_by_adam(), optax.add_decayed_weights(WEIGHT_DECAY),
              optax.scale_by_learning_rate(lambda c: lr * unit(c))]
    if spec.remedy == "dampening":
      stages.insert(0, _dampening(tnnx.centers_fn_for(model), knob))
    elif spec.remedy == "freezing":
      stages.append(_freezing(levels_fn, tnnx.centers_fn_for(model), knob, axes))
    # The baseline's K against the default target (lambda = 5e-3), EMA by the rule.
    stages.append(talr.track_transitions(levels_fn, target(run, 5e-3), layer_axes=axes))
    quantized = optax.chain(*stages)
  quantized = optax.chain(quantized, talr.track_oscillations(levels_fn, layer_axes=axes))
  return optax.partition({tnnx.QUANTIZED: quantized, tnnx.FULL_PRECISION: full_precision},
                         tnnx.param_labels(model))


def frozen_fraction(opt_state: Any) -> Optional[jax.Array]:
  """Fraction of all quantized weights that are frozen (``None`` without freezing)."""
  is_freezing = lambda x: isinstance(x, talr.FreezeOscillationsState)
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_freezing) if is_freezing(s)]
  masks = [m for s in states for m in jax.tree.leaves(s.frozen)]
  if not masks:
    return None
  return (sum(jnp.sum(m, dtype=jnp.float32) for m in masks)
          / float(sum(m.size for m in masks)))


@functools.partial(nnx.jit, static_argnums=0)
def train_step(run: Run, model: nnx.Module, opt_state: Any, knobs: jax.Array,
               windows: jax.Array) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """One update of ``model`` (in place), compiled once per ``run``.

  As the demo's ``lm_train.train_step``, with this study's optimizers.

  Args:
    run: static settings.
    model: the model; its parameters are updated in place.
    opt_state: the optimizer's state.
    knobs: float32 ``[knob, base]``.
    windows: ``(B, T + 1)`` byte ids.

  Returns:
    ``(loss, opt_state, metrics)``: the mean loss before the update, the new
    state, and the mean rates (plus ``frozen`` with freezing).
  """
  loss, grads = nnx.value_and_grad(lambda m: next_byte_loss(m, windows).mean())(model)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  updates, opt_state = optimizer(run, model, knobs[0], knobs[1]).update(
      nnx.as_pure(grads), opt_state, params)
  nnx.update(model, optax.apply_updates(params, updates))
  m = step_metrics(opt_state) if run.bits is not None else {}
  frozen = frozen_fraction(opt_state) if run.bits is not None else None
  if frozen is not None:
    m["frozen"] = frozen
  return loss, opt_state, m


def train_run(cfg: StudyConfig, data: Any, fp_model: nnx.Module,
              arm: str, bits: Optional[int], seed: int, knob: float, base: float = 0.0
              ) -> dict[str, Any]:
  """One run from the pretrained model: its record for ``results.json``.

  Args:
    cfg: the study's settings.
    data: the demo's corpus and validation windows.
    fp_model: the pretrained model (not modified).
    arm: the arm's name.
    bits: weight bits (``None`` for the full-precision reference).
    seed: fixes the calibration batch and the data order.
    knob: the arm's value.
    base: the chosen value of its base arm.

  Returns:
    Final bits per byte, the validation curve, tracking error, late
    oscillation frequency, final frozen fraction, and traces every
    ``_TRACE_EVERY`` steps.
  """
  model = make_model(cfg, bits, seed)
  tnnx.load_full_precision(model, fp_model)
  rng = np.random.default_rng(seed)
  if bits is not None:
    tnnx.calibrate(model, jnp.asarray(windows_for(cfg, data, cfg.context, rng)))
  run = Run(arm, bits, cfg.steps, cfg.lr)
  knobs = jnp.asarray([knob, base], jnp.float32)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  opt_state = optimizer(run, model, knobs[0], knobs[1]).init(params)
  model.train()
  trace: dict[str, list[float]] = {}
  evals: dict[str, list[float]] = {"step": [], METRIC: []}
  done = 0
  while done < cfg.steps:
    chunk = min(cfg.eval_every, cfg.steps - done)
    pending = []
    for _ in range(chunk):
      w = jnp.asarray(windows_for(cfg, data, cfg.context + 1, rng))
      loss, opt_state, m = train_step(run, model, opt_state, knobs, w)
      pending.append((loss, m))
    for loss, m in jax.device_get(pending):  # one transfer per chunk
      trace.setdefault("loss", []).append(float(loss))
      for key, value in m.items():
        trace.setdefault(key, []).append(float(value))
    done += chunk
    evals["step"].append(done)
    evals[METRIC].append(bits_per_byte(model, data.val))
  record = {"arm": arm, "bits": bits, "seed": seed, "knob": knob, "base": base,
            "final": evals[METRIC][-1], "evals": evals}
  if bits is None:
    return record | {"tracking_error": None, "late_oscillation": None, "frozen_fraction": None,
                     "r0": None, "trace": {"loss": trace["loss"][::_TRACE_EVERY]}}
  spec = {a.name: a for a in arm_specs()}[arm]
  lam = (knob if spec.base is None else base) if spec.talr else 5e-3
  r0 = lam * math.sqrt(bits)
  if "R" not in trace:  # a baseline: its K against the default target; entry n after update n
    trace["R"] = np.asarray(target(run, lam)(jnp.arange(1, cfg.steps + 1))).tolist()
  return record | {
      "r0": r0,
      "tracking_error": tracking_error(trace, r0),
      "late_oscillation": late_oscillation(trace),
      "frozen_fraction": trace["frozen"][-1] if "frozen" in trace else None,
      "trace": {k: v[::_TRACE_EVERY] for k, v in trace.items() if k in ("loss", "K", "R",
                                                                          "osc", "frozen")},
  }


# ---------------------------------------------------------------------------
# The procedure, the summary, the figures.


def _tune(cfg: StudyConfig, spec: ArmSpec, bits: Optional[int], base: float, qat: Any
          ) -> tuple[float, list[dict[str, Any]]]:
  """Runs ``spec``'s values on seed 0; returns the best value and the runs."""
  runs = [qat(spec.name, bits, 0, v, base) for v in spec.values]
  best = min(runs, key=lambda r: r["final"])
  for r in runs:
    print(f"  tune W{bits} {spec.label} {spec.knob}={r['knob']:g}: {r['final']:.4f}"
          + (" (chosen)" if r is best else ""), flush=True)
  return best["knob"], runs


def _row(runs: list[dict[str, Any]], arm: ArmSpec, bits: Optional[int], tuned: float,
         tuning: list[dict[str, Any]]) -> dict[str, Any]:
  sel = sorted((r for r in runs if r["arm"] == arm.name and r["bits"] == bits),
               key=lambda r: r["seed"])
  finals = [r["final"] for r in sel]
  mean_of = lambda key: (None if sel[0][key] is None
                         else float(np.mean([r[key] for r in sel])))
  return {
      "task": TASK, "bits": bits, "arm": arm.name, "label": arm.label,
      "seeds": [r["seed"] for r in sel], "metric": METRIC,
      "mean": float(np.mean(finals)), "std": float(np.std(finals, ddof=1)) if len(sel) > 1
      else 0.0,
      "per_seed": finals,
      "paired_diff_vs_best_baseline": None, "paired_diff_ci95": None, "best_baseline": None,
      "conclusion": None, "better_on_seeds": None,
      "tracking_error": mean_of("tracking_error"),
      "late_oscillation": mean_of("late_oscillation"),
      "frozen_fraction": mean_of("frozen_fraction"),
      "tuned_value": tuned, "knob": arm.knob,
      "tuning": [{"value": r["knob"], "seed0_" + METRIC: r["final"]} for r in tuning],
  }


def _paired(runs: list[dict[str, Any]], bits: int, arm: str, ref: str) -> dict[str, Any]:
  """``arm`` minus ``ref`` at ``bits``, seed by seed: the interval and its conclusion."""
  finals = lambda name: {r["seed"]: r["final"] for r in runs
                         if r["bits"] == bits and r["arm"] == name}
  mine, theirs = finals(arm), finals(ref)
  interval = _stats.paired_interval([mine[s] - theirs[s] for s in sorted(mine) if s in theirs])
  return {"mean": interval["mean"], "ci": interval["ci"],
          "conclusion": _stats.conclusion(interval["ci"]), "lower_on": interval["lower_on"]}


def summarize(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Fills each QAT row's paired differences to the best baseline and to plain AdamW.

  The best baseline is the non-TALR arm with the lowest mean. Its own row
  compares with the next best baseline, so every row has an interval. Every
  QAT row but AdamW's own also compares with plain AdamW (``*_vs_adamw``),
  the optimizer the remedies and TALR are added to.
  """
  for row in rows:
    row.update(dict.fromkeys(("paired_diff_vs_adamw", "paired_diff_vs_adamw_ci95",
                              "conclusion_vs_adamw", "better_than_adamw_on_seeds")))
  for bits in sorted({r["bits"] for r in rows if r["bits"] is not None}):
    width = [r for r in rows if r["bits"] == bits]
    baselines = sorted((r for r in width if r["arm"] in BASELINES), key=lambda r: r["mean"])
    if not baselines:
      continue
    has_adamw = any(r["arm"] == "adamw" for r in width)
    for row in width:
      ref = baselines[0] if row is not baselines[0] else (
          baselines[1] if len(baselines) > 1 else None)
      if ref is not None:
        p = _paired(runs, bits, row["arm"], ref["arm"])
        row.update(best_baseline=ref["arm"], paired_diff_vs_best_baseline=p["mean"],
                   paired_diff_ci95=p["ci"], conclusion=p["conclusion"],
                   better_on_seeds=p["lower_on"])
      if has_adamw and row["arm"] != "adamw":
        p = _paired(runs, bits, row["arm"], "adamw")
        row.update(paired_diff_vs_adamw=p["mean"], paired_diff_vs_adamw_ci95=p["ci"],
                   conclusion_vs_adamw=p["conclusion"], better_than_adamw_on_seeds=p["lower_on"])
  return rows


def study(cfg: StudyConfig) -> dict[str, Any]:
  """Runs the study; returns the results (without ``machine``)."""
  start = time.perf_counter()
  data = load_data(cfg)
  print(f"pretraining {cfg.fp_steps} steps", flush=True)
  fp_model, pretraining = pretrain(cfg, data)
  qat = functools.partial(train_run, cfg, data, fp_model)
  runs, tuning_runs, rows = [], [], []
  eval_seeds = range(1, cfg.seeds + 1)
  for bits in (None, *cfg.bits):
    chosen: dict[str, float] = {}
    for spec in cfg.specs():
      if (bits is None) != (spec.name == FP_REFERENCE):
        continue
      base = chosen.get(spec.base, 0.0) if spec.base else 0.0
      chosen[spec.name], tuning = _tune(cfg, spec, bits, base, qat)
      tuning_runs += tuning
      mine = [qat(spec.name, bits, s, chosen[spec.name], base) for s in eval_seeds]
      runs += mine
      print(f"W{bits} {spec.label}: {np.mean([r['final'] for r in mine]):.4f} over seeds "
            f"{list(eval_seeds)} ({time.perf_counter() - start:.0f} s)", flush=True)
      rows.append(_row(runs, spec, bits, chosen[spec.name], tuning))
  return {
      "config": dataclasses.asdict(cfg),
      "arms": [dataclasses.asdict(a) for a in cfg.specs()],
      "freeze_ema_momentum": FREEZE_EMA_MOMENTUM,
      "ema_momentum_adamwt": talr.ema_momentum_for(cfg.steps),
      "data": data.corpus.facts,
      "model": model_facts(cfg),
      "pretraining": {"steps": cfg.fp_steps, "final_" + METRIC: pretraining["final_bits_per_byte"],
                      "evals": pretraining["evals"]},
      "summary": summarize(rows, runs),
      "runs": runs,
      "tuning_runs": [{k: v for k, v in r.items() if k != "trace"} for r in tuning_runs],
      "seconds": time.perf_counter() - start,
  }


def model_facts(cfg: StudyConfig) -> dict[str, Any]:
  """Parameter counts of the quantized model (from shapes only)."""
  model = nnx.eval_shape(lambda: make_model(cfg, cfg.bits[0], 0))
  labels = jax.tree.leaves(tnnx.param_labels(model))
  sizes = [x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
  return {"width": cfg.width, "layers": cfg.layers, "heads": cfg.heads, "context": cfg.context,
          "parameters": int(sum(sizes)),
          "quantized_parameters": int(sum(n for n, l in zip(sizes, labels)
                                          if l == tnnx.QUANTIZED))}


# The instruction-set extensions that decide which matrix-product kernels run.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def _cpu_isa() -> list[str]:
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return []
  return [name for name in _ISA_FLAGS if name in flags]


def machine() -> dict[str, Any]:
  """CPU and its ISA extensions, core count, versions, XLA flags, a oneDNN ISA cap if set."""
  import flax  # pylint: disable=import-outside-toplevel
  return _harness.meta(sys.argv[1:], flax=flax.__version__, cpu_isa=_cpu_isa(),
                       onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA"),
                       load_average=_harness.loadavg())


def _fmt_ci(row: dict[str, Any]) -> str:
  if row["paired_diff_ci95"] is None:
    return ""
  low, high = row["paired_diff_ci95"]
  return (f"{row['paired_diff_vs_best_baseline']:+.4f} [{low:+.4f}, {high:+.4f}] vs "
          f"{row['best_baseline']}: {row['conclusion']}")


def print_summary(results: dict[str, Any]) -> None:
  """Prints the summary table."""
  fmt = lambda x, f: "" if x is None else format(x, f)
  _harness.print_table(
      "QAT study (validation bits per byte; paired difference to the best baseline, 95 % t)",
      ["bits", "arm", "tuned", "bits/byte", "|K-R|/R0", "late osc.", "frozen", "paired diff"],
      [[f"W{r['bits']}" if r["bits"] else "fp", r["label"], f"{r['tuned_value']:g}",
        f"{r['mean']:.4f} ± {r['std']:.4f}", fmt(r["tracking_error"], ".3f"),
        fmt(r["late_oscillation"], ".2e"), fmt(r["frozen_fraction"], ".4f"), _fmt_ci(r)]
       for r in results["summary"]])


def plot(results: dict[str, Any], out: Path, stem: str) -> list[str]:
  """Two figures: paired differences with their intervals; K of three arms and AdamWT's R."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = [r for r in results["summary"] if r["paired_diff_ci95"] is not None]
  bits = sorted({r["bits"] for r in rows})
  paths = []
  fig, axes = plt.subplots(1, len(bits), figsize=(5 * len(bits), 3.2), squeeze=False)
  for ax, b in zip(axes[0], bits):
    sel = [r for r in rows if r["bits"] == b]
    y = np.arange(len(sel))
    mean = np.array([r["paired_diff_vs_best_baseline"] for r in sel])
    ci = np.array([r["paired_diff_ci95"] for r in sel])
    ax.errorbar(mean, y, xerr=[mean - ci[:, 0], ci[:, 1] - mean], fmt="o", capsize=3)
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set_yticks(y, [f"{r['label']} (vs {r['best_baseline']})" for r in sel], fontsize=7)
    ax.set_xlabel("bits/byte minus best baseline (95 % CI)")
    ax.set_title(f"W{b}")
  fig.tight_layout()
  paths.append(str(out / f"{stem}_paired.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  fig, axes = plt.subplots(1, len(bits), figsize=(5 * len(bits), 3.2), squeeze=False)
  for ax, b in zip(axes[0], bits):
    for arm in ("adamw", "adamw_freezing", "adamwt"):
      sel = [r for r in results["runs"] if r["bits"] == b and r["arm"] == arm]
      if not sel:
        continue
      K = np.mean([np.asarray(r["trace"]["K"]) for r in sel], axis=0)
      steps = np.arange(len(K)) * _TRACE_EVERY
      ax.plot(steps, K, label=f"K {sel[0]['arm']}")
      if arm == "adamwt":  # the baselines' R is only the default target they are measured by
        ax.plot(steps, np.asarray(sel[0]["trace"]["R"]), "k--", lw=0.8, label="R of adamwt")
    ax.set_xlabel("QAT step")
    ax.set_ylabel("transitions per weight per step")
    ax.set_title(f"W{b}: K, the EMA of the rate (mean of seeds)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(str(out / f"{stem}_tracking.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


def _write(results: dict[str, Any], out: Path, stem: str) -> None:
  out.mkdir(parents=True, exist_ok=True)
  results["figures"] = [os.path.basename(p) for p in plot(results, out, stem)]
  print_summary(results)
  _harness.write_json(str(out / f"{stem}.json"), results)


def resummarize(path: str, out: Path) -> dict[str, Any]:
  """Recomputes the summary and figures of a results file from its runs (no training).

  The summary is a function of the runs alone, so a new comparison or figure
  needs no rerun. Writes ``<stem>.json`` and the figures to ``out``.
  """
  with open(path) as f:
    results = json.load(f)
  summarize(results["summary"], results["runs"])
  _write(results, out, Path(path).stem)
  return results


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Command line: ``--quick``, ``--out DIR``, ``--arms a,b``, ``--seeds N``, ``--width N``,
  ``--from-results FILE``."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="small model, short runs (smoke run)")
  ap.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
  ap.add_argument("--arms", default=None, help="comma-separated arms (default all)")
  ap.add_argument("--seeds", type=int, default=None, help="evaluation seeds (default 5)")
  ap.add_argument("--width", type=int, default=None,
                  help="model width (default 80; heads: 2, so it must be even)")
  ap.add_argument("--from-results", default=None, metavar="FILE",
                  help="no training: recompute the summary and figures of FILE from its runs")
  args = ap.parse_args(argv)
  if args.from_results is not None:
    try:
      with open(args.from_results) as f:
        keys = set(json.load(f))
    except (OSError, ValueError) as e:
      ap.error(f"--from-results: cannot read a results file from {args.from_results!r}: {e}")
    if not {"summary", "runs"} <= keys:
      ap.error(f"--from-results: {args.from_results!r} has no 'summary' and 'runs': not a "
               "results file of this script")
    return resummarize(args.from_results, Path(args.out))
  values = dict(QUICK) if args.quick else {}
  if args.arms:
    values["arms"] = tuple(args.arms.split(","))
    unknown = set(values["arms"]) - {a.name for a in arm_specs()}
    if unknown:
      ap.error(f"--arms: unknown {sorted(unknown)}; choose from "
               f"{[a.name for a in arm_specs()]}")
  if args.seeds is not None:
    values["seeds"] = args.seeds
  if args.width is not None:
    if args.width < 2 or args.width % 2:
      ap.error(f"--width must be an even int >= 2, got {args.width}")
    values["width"] = args.width
  cfg = StudyConfig(**values)
  # Before training: the commit recorded is the one that ran, whatever lands meanwhile.
  before = machine()
  results = study(cfg)
  results["machine"] = before | {"load_average_start": before["load_average"],
                                 "load_average": _harness.loadavg()}
  _write(results, Path(args.out), "quick" if cfg.quick else "results")
  print(f"{results['seconds']:.0f} s")
  return results


if __name__ == "__main__":
  main()
