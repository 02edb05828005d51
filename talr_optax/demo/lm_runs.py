"""The language-model task: pretraining, the baseline's sweep, QAT over seeds, results.

Procedure (``python -m talr_optax.demo --task lm``):

1. Pretrain one full-precision :class:`~talr_optax.nnx.TransformerLM` with
   AdamW (seed 0). Every QAT run starts from it, as QAT starts from one
   pretrained checkpoint in the paper; seeds vary the QAT data order.
2. For each bit width, sweep the baseline's learning rate on seed 0
   (``baseline_lrs`` multiples of the base rate) and keep the one with the
   lowest final validation bits per byte.
3. For each seed: the baseline (AdamW, cosine learning rate, the chosen
   multiple) and AdamWT (base rate ``lr``, cosine target ``R_0 = lambda
   sqrt(b)``, one rate per layer), from the same model and the same data.

Writes ``results.json`` (configuration, data and model facts, the sweep, the
summary, every run with its per-step traces) and six figures. The model, data,
optimizer arms and step are in :mod:`~talr_optax.demo.lm_train`; what every
task shares (progress, record, summary, output) in
:mod:`~talr_optax.demo.runner`.

Who imports whom: this module imports the runner and
:mod:`~talr_optax.demo.lm_train`, and hands the runner :data:`TASK`; the
runner never imports it. :func:`talr_optax.demo.cli.task_of` imports it when
a run needs it (it imports Flax).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from talr_optax import nnx as tnnx
from talr_optax.demo import lm_train, runner
from talr_optax.demo.lm_config import LMConfig
from talr_optax.demo.lm_train import LMData
from talr_optax.demo.runner import Progress


def total_steps(cfg: LMConfig) -> int:
  """Training steps of the whole procedure (the progress bar's length).

  Args:
    cfg: the task's settings.

  Returns:
    Pretraining steps plus, per bit width, the sweep's runs on seed 0, the
    TALR runs of every seed and the baseline runs of the other seeds.
  """
  runs_per_width = len(cfg.baseline_lrs) + cfg.seeds + (cfg.seeds - 1)
  return cfg.fp_steps + len(cfg.bits) * runs_per_width * cfg.steps


def model_facts(cfg: LMConfig, bits: int) -> dict[str, Any]:
  """What the QAT model is: sizes, parameter counts, what is quantized.

  Args:
    cfg: the task's settings.
    bits: weight bits.

  Returns:
    A JSON-ready dict (built from shapes only; no parameter is drawn).
  """
  model = nnx.eval_shape(lambda: lm_train.make_model(cfg, bits, 0))
  labels = jax.tree.leaves(tnnx.param_labels(model))
  sizes = [x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
  quantized = sum(n for n, label in zip(sizes, labels) if label == tnnx.QUANTIZED)
  return {
      "architecture": "decoder-only byte-level transformer, pre-norm, learned positions",
      "vocab_size": 256, "context": cfg.context, "width": cfg.width, "layers": cfg.layers,
      "heads": cfg.heads, "mlp_hidden": 4 * cfg.width,
      "parameters": int(sum(sizes)), "quantized_parameters": int(quantized),
      "quantized": "attention query/key/value/out and MLP up/down kernels, weights only",
      "full_precision": "token and position embeddings, layer norms, output layer",
      "rate_groups_per_width": 6 * cfg.layers,
  }


def _mean_std(values: list[float]) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values))


def paired_differences(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """TALR minus baseline bits per byte, seed by seed (same start, same data).

  Args:
    runs: records of the QAT runs.

  Returns:
    One row per bit width: the differences, their mean and std, and on how
    many seeds TALR is lower.
  """
  rows = []
  for bits in sorted({r["bits"] for r in runs}):
    by = {(r["method"], r["seed"]): r["final_bits_per_byte"] for r in runs if r["bits"] == bits}
    seeds = sorted(s for m, s in by if m == "talr" and ("sgd", s) in by)
    diffs = [by["talr", s] - by["sgd", s] for s in seeds]
    if diffs:
      mean, std = _mean_std(diffs)
      rows.append({"bits": bits, "seeds": len(diffs), "talr_minus_baseline": diffs,
                   "mean": mean, "std": std, "talr_better_on": sum(d < 0 for d in diffs)})
  return rows


def _sweep_row(record: dict[str, Any]) -> dict[str, Any]:
  keys = ("bits", "seed", "lr_scale", "learning_rate", "final_bits_per_byte",
          "tracking_error", "late_oscillation_frequency")
  return {key: record[key] for key in keys}


def _width(cfg: LMConfig, data: LMData, fp_model: nnx.Module, bits: int,
           progress: Progress) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """The sweep (seed 0) and the runs of every seed at ``bits``."""
  qat = lambda seed, method, scale=1.0: runner.train_arm(  # noqa: E731
      TASK, cfg, data, fp_model, bits=bits, seed=seed, method=method, lr_scale=scale,
      progress=progress)
  progress.describe(f"W{bits}: baseline sweep, seed 0")
  sweep = [qat(0, "sgd", scale) for scale in cfg.baseline_lrs]
  best = min(sweep, key=lambda r: r["final_bits_per_byte"])
  runs = [best]
  for seed in range(cfg.seeds):
    progress.describe(f"W{bits}: seed {seed}")
    if seed > 0:
      runs.append(qat(seed, "sgd", best["lr_scale"]))
    runs.append(qat(seed, "talr"))
  return [_sweep_row(r) | {"chosen": r is best} for r in sweep], runs


def _procedure(cfg: LMConfig, data: LMData, progress: Progress
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Pretraining, then the sweep and the seeds of each bit width."""
  sweep, runs = [], []
  progress.describe("full-precision pretraining")
  fp_model, pretraining = lm_train.pretrain(cfg, data, 0, progress)
  for bits in cfg.bits:
    width_sweep, width_runs = _width(cfg, data, fp_model, bits, progress)
    sweep += width_sweep
    runs += width_runs
  return runs, {
      "config": {"weight_only": True},
      "data": data.corpus.facts | {"eval_windows": cfg.eval_windows,
                                   "eval_bytes_predicted": cfg.eval_windows * cfg.context},
      "model": {f"W{bits}": model_facts(cfg, bits) for bits in cfg.bits},
      "pretraining": pretraining,
      "sweep": sweep,
      "paired": paired_differences(runs),
  }


def run(cfg: LMConfig) -> dict[str, Any]:
  """Runs the language-model task (see :func:`talr_optax.demo.runner.run`).

  Args:
    cfg: the task's settings.

  Returns:
    The results, as written to ``results.json``.
  """
  return runner.run(TASK, cfg)


def print_tables(cfg: LMConfig, results: dict[str, Any]) -> None:
  """Prints the sweep, the summary (mean ± std over seeds) and the paired differences.

  Args:
    cfg: the task's settings (for the method names).
    results: as written to ``results.json``.
  """
  from rich.table import Table  # pylint: disable=import-outside-toplevel

  console = runner.console()
  sweep = Table()
  for col in ("bits", "peak lr", "val bits/byte", "mean |K-R|/R0", "late osc. freq.", ""):
    sweep.add_column(col, justify="right", no_wrap=True)
  for r in results["sweep"]:
    sweep.add_row(f"W{r['bits']}", f"{r['learning_rate']:.1e}", f"{r['final_bits_per_byte']:.4f}",
                  f"{r['tracking_error']:.3f}", f"{r['late_oscillation_frequency']:.2e}",
                  "chosen" if r["chosen"] else "")
  runner.print_table(f"Baseline learning-rate sweep ({cfg.labels['sgd']}, seed 0)", sweep)
  fp = results["pretraining"]["final_bits_per_byte"]
  runner.summary_table(
      f"QAT of a byte-level transformer on the stdlib, {cfg.steps} steps, validation bits "
      f"per byte over seeds (full precision: {fp:.4f})", results["summary"], SCORE,
      lambda bits: f"W{bits}", cfg.labels)
  for p in results["paired"]:
    console.print(f"W{p['bits']}: {cfg.labels['talr']} - {cfg.labels['sgd']} = "
                  f"{p['mean']:+.4f} ± {p['std']:.4f} bits/byte (paired over {p['seeds']} "
                  f"seeds; {cfg.labels['talr']} lower on {p['talr_better_on']})")


SCORE = runner.Score("bits_per_byte", "final_bits_per_byte", "val bits/byte", digits=4)

TASK = runner.TaskDef(
    name="lm", unit="steps", total=total_steps, load=lm_train.load,
    pretrain=lambda cfg, data, seed, progress=None: lm_train.pretrain(cfg, data, seed,
                                                                      progress)[0],
    train_arm=lm_train.run_qat, procedure=_procedure, score=SCORE, print_tables=print_tables)
