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
summary, every run with its per-step traces) and the figures.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

import talr_optax as talr
from talr_optax import nnx as tnnx
from talr_optax.demo import export, lm_data, lm_train, plots, store
from talr_optax.demo.config import METHODS
from talr_optax.demo.lm_config import VAL_EVERY, LMConfig


class _Bar:
  """The progress bar: one tick per training step (pretraining and QAT)."""

  def __init__(self, cfg: LMConfig):
    from rich import progress as rp  # pylint: disable=import-outside-toplevel
    self._bar = rp.Progress(
        rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(), rp.TextColumn("{task.fields[status]}"))
    self._task = self._bar.add_task("steps", total=total_steps(cfg), status="")

  def __enter__(self) -> "_Bar":
    self._bar.__enter__()
    return self

  def __exit__(self, *exc: Any) -> None:
    self._bar.__exit__(*exc)

  def describe(self, text: str) -> None:
    self._bar.update(self._task, description=text)

  def report(self, steps: int, status: str) -> None:
    """The ``progress`` callback of :mod:`talr_optax.demo.lm_train`."""
    self._bar.update(self._task, advance=steps, status=status)


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


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The summary rows of ``results.json``.

  Args:
    runs: records of :func:`lm_train.run_qat`.

  Returns:
    One row per (bits, method): seeds, learning rate, bits per byte (mean
    and std over seeds), mean tracking error, mean late oscillation
    frequency, mean md2tp.
  """
  rows = []
  for bits in sorted({r["bits"] for r in runs}):
    for method in METHODS:
      sel = [r for r in runs if r["bits"] == bits and r["method"] == method]
      if not sel:
        continue
      mean, std = _mean_std([r["final_bits_per_byte"] for r in sel])
      rows.append({
          "bits": bits, "method": method, "seeds": len(sel),
          "learning_rate": sel[0]["learning_rate"],
          "bits_per_byte_mean": mean, "bits_per_byte_std": std,
          "tracking_error_mean": float(np.mean([r["tracking_error"] for r in sel])),
          "late_oscillation_frequency_mean": float(np.mean(
              [r["late_oscillation_frequency"] for r in sel])),
          "md2tp_mean": float(np.mean([r["md2tp_histogram"]["mean"] for r in sel])),
      })
  return rows


def paired_differences(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """TALR minus baseline bits per byte, seed by seed (same start, same data).

  Args:
    runs: records of :func:`lm_train.run_qat`.

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


def _width(cfg: LMConfig, corpus: lm_data.ByteCorpus, val: np.ndarray, fp_model: nnx.Module,
           bits: int, bar: _Bar) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """The sweep (seed 0) and the runs of every seed at ``bits``."""
  qat = lambda seed, method, scale=1.0: lm_train.run_qat(
      cfg, corpus, val, fp_model, bits, seed, method, scale, progress=bar.report)
  bar.describe(f"W{bits}: baseline sweep, seed 0")
  sweep = [qat(0, "sgd", scale) for scale in cfg.baseline_lrs]
  best = min(sweep, key=lambda r: r["final_bits_per_byte"])
  runs = [best]
  for seed in range(cfg.seeds):
    bar.describe(f"W{bits}: seed {seed}")
    if seed > 0:
      runs.append(qat(seed, "sgd", best["lr_scale"]))
    runs.append(qat(seed, "talr"))
  return [_sweep_row(r) | {"chosen": r is best} for r in sweep], runs


def _load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:  # pragma: no cover - not on every platform
    return None


def run(cfg: LMConfig) -> dict[str, Any]:
  """Runs the language-model task; writes ``results.json`` and the figures to ``cfg.out``.

  Args:
    cfg: the task's settings.

  Returns:
    The results, as written to ``results.json``.

  Raises:
    FileNotFoundError, ValueError: no standard library source, or a split
      shorter than one window.
  """
  start = time.perf_counter()
  load_start = _load_average()
  corpus = lm_data.load_stdlib(val_every=VAL_EVERY, min_bytes=cfg.context + 1)
  val = lm_data.fixed_windows(corpus.val, cfg.context + 1, cfg.eval_windows)
  sweep, runs = [], []
  with _Bar(cfg) as bar:
    bar.describe("full-precision pretraining")
    fp_model, pretraining = lm_train.pretrain(cfg, corpus, val, 0, progress=bar.report)
    for bits in cfg.bits:
      width_sweep, width_runs = _width(cfg, corpus, val, fp_model, bits, bar)
      sweep += width_sweep
      runs += width_runs
  results = {
      "config": {**dataclasses.asdict(cfg), "method_labels": cfg.labels, "weight_only": True},
      "data": corpus.facts | {"eval_windows": cfg.eval_windows,
                              "eval_bytes_predicted": cfg.eval_windows * cfg.context},
      "model": {f"W{bits}": model_facts(cfg, bits) for bits in cfg.bits},
      "pretraining": pretraining,
      "sweep": sweep,
      "summary": summarize(runs),
      "paired": paired_differences(runs),
      "runs": runs,
      "seconds": time.perf_counter() - start,
      "load_average": {"start": load_start, "end": _load_average()},
      "versions": {"jax": jax.__version__, "optax": optax.__version__,
                   "talr_optax": talr.__version__},
  }
  out = Path(cfg.out)
  store.write_json_atomic(out / "results.json", results)
  figures = plots.plot_all(results, out)
  print_tables(cfg, results)
  export.print_reports(runs, "val bits/byte")
  print(f"wrote {out / 'results.json'} and {len(figures)} figures to {out}/ "
        f"in {results['seconds']:.0f} s")
  return results


def print_tables(cfg: LMConfig, results: dict[str, Any]) -> None:
  """Prints the sweep, the summary (mean ± std over seeds) and the paired differences.

  Args:
    cfg: the task's settings (for the method names).
    results: as returned by :func:`run`.
  """
  from rich.console import Console  # pylint: disable=import-outside-toplevel
  from rich.table import Table  # pylint: disable=import-outside-toplevel

  console = Console()
  sweep = Table(title=f"Baseline learning-rate sweep ({cfg.labels['sgd']}, seed 0)")
  for col in ("bits", "peak lr", "val bits/byte", "mean |K-R|/R0", "late osc. freq.", ""):
    sweep.add_column(col, justify="right")
  for r in results["sweep"]:
    sweep.add_row(f"W{r['bits']}", f"{r['learning_rate']:.1e}", f"{r['final_bits_per_byte']:.4f}",
                  f"{r['tracking_error']:.3f}", f"{r['late_oscillation_frequency']:.2e}",
                  "chosen" if r["chosen"] else "")
  console.print(sweep)
  fp = results["pretraining"]["final_bits_per_byte"]
  table = Table(title=f"QAT of a byte-level transformer on the stdlib, {cfg.steps} steps, "
                      f"validation bits per byte over seeds (full precision: {fp:.4f})")
  for col in ("bits", "optimizer", "peak lr", "seeds", "val bits/byte", "mean |K-R|/R0",
              "late osc. freq."):
    table.add_column(col, justify="right")
  for r in results["summary"]:
    table.add_row(f"W{r['bits']}", cfg.labels[r["method"]], f"{r['learning_rate']:.1e}",
                  str(r["seeds"]), f"{r['bits_per_byte_mean']:.4f} ± {r['bits_per_byte_std']:.4f}",
                  f"{r['tracking_error_mean']:.3f}",
                  f"{r['late_oscillation_frequency_mean']:.2e}")
  console.print(table)
  for p in results["paired"]:
    console.print(f"W{p['bits']}: {cfg.labels['talr']} - {cfg.labels['sgd']} = "
                  f"{p['mean']:+.4f} ± {p['std']:.4f} bits/byte (paired over {p['seeds']} "
                  f"seeds; {cfg.labels['talr']} lower on {p['talr_better_on']})")
