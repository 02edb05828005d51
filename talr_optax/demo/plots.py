"""Figures of a demo run (matplotlib), each readable on its own.

Every function takes the ``results`` dict that :func:`talr_optax.demo.run` writes to
``results.json`` and saves one PNG. Traces are drawn for seed 0 of each bit
width; accuracy curves show the mean over seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["plot_all"]

_COLORS = {"sgd": "tab:gray", "talr": "tab:blue"}


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def _runs(results: dict[str, Any], bits: int, method: str) -> list[dict[str, Any]]:
  return [r for r in results["runs"] if r["bits"] == bits and r["method"] == method]


def _bits(results: dict[str, Any]) -> list[int]:
  return sorted({r["bits"] for r in results["runs"]}, reverse=True)


def _label(results: dict[str, Any], method: str) -> str:
  return results["config"]["method_labels"][method]


def _name(results: dict[str, Any], bits: int) -> str:
  """``W2A2``, or ``W2`` when only weights are quantized (the language model)."""
  return f"W{bits}" if results["config"].get("weight_only") else f"W{bits}A{bits}"


def _per_evaluation(run: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray, str]:
  """``(x, values, x label)`` of a per-evaluation series: per epoch, or per ``evals`` step."""
  if "evals" in run:
    return np.asarray(run["evals"]["step"]), np.asarray(run["evals"][key]), "training step"
  values = np.asarray(run[f"{key}_per_epoch"])
  return np.arange(1, len(values) + 1), values, "epoch"


def _over_seeds(ax, results: dict[str, Any], bits: int,
                series: Callable[[dict[str, Any]], tuple[np.ndarray, np.ndarray]],
                **style: Any) -> None:
  """Per method, the mean over seeds of ``series(run) -> (x, y)``; band: min to max."""
  for method in ("sgd", "talr"):
    runs = _runs(results, bits, method)
    if not runs:
      continue
    x = series(runs[0])[0]
    y = np.array([series(r)[1] for r in runs])
    ax.plot(x, y.mean(0), color=_COLORS[method],
            label=f"{_label(results, method)} ({len(runs)} seeds)", **style)
    ax.fill_between(x, y.min(0), y.max(0), color=_COLORS[method], alpha=0.2)


def _smooth(x: np.ndarray, n: int) -> np.ndarray:
  if n <= 1 or len(x) < n:
    return x
  return np.convolve(x, np.ones(n) / n, mode="same")


def _grid(plt, results, title):
  bits = _bits(results)
  fig, axes = plt.subplots(1, len(bits), figsize=(5.5 * len(bits), 4), squeeze=False)
  fig.suptitle(title)
  return fig, list(zip(bits, axes[0]))


def _finish(ax, title: str, xlabel: str, ylabel: str) -> None:
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)


def _save(fig, out: Path, name: str) -> Path:
  path = out / name
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  _pyplot().close(fig)  # pyplot keeps every figure open until closed
  return path


def plot_rate_tracking(results: dict[str, Any], out: Path) -> Path:
  """(1) Transition rate k (per step) and its EMA K against the target R."""
  plt = _pyplot()
  fig, panels = _grid(plt, results, "Transition rate follows the target (TALR)")
  for bits, ax in panels:
    run = _runs(results, bits, "talr")[0]["trace"]
    step = np.arange(len(run["k"]))
    ax.plot(step, run["k"], color="tab:blue", alpha=0.25, lw=0.6, label="k (per step)")
    ax.plot(step, run["K"], color="tab:blue", lw=1.6, label="K (EMA of k)")
    ax.plot(step, run["R"], color="black", ls="--", lw=1.2, label="target R")
    base = _runs(results, bits, "sgd")
    if base:
      ax.plot(step, base[0]["trace"]["K"], color="tab:gray", lw=1.0,
              label=f"K of {_label(results, 'sgd')}")
    top = 2.5 * max(max(run["R"]), 1e-6)
    ax.set_ylim(0, top)
    _finish(ax, _name(results, bits), "training step",
            "fraction of quantized weights changing level")
  return _save(fig, out, "rate_tracking.png")


def plot_learning_rates(results: dict[str, Any], out: Path) -> Path:
  """(2) TALR U of the quantized weights against the baseline learning rate."""
  plt = _pyplot()
  fig, panels = _grid(plt, results, "Learning rate of quantized weights")
  for bits, ax in panels:
    run = _runs(results, bits, "talr")[0]["trace"]
    step = np.arange(len(run["U"]))
    ax.plot(step, run["U"], color="tab:blue", label="TALR U (mean over tensors)")
    base = _runs(results, bits, "sgd")
    if base:
      ax.plot(step, base[0]["trace"]["lr"], color="tab:gray",
              label=f"{_label(results, 'sgd')} learning rate (cosine)")
    _finish(ax, _name(results, bits), "training step", "learning rate")
  return _save(fig, out, "learning_rates.png")


def plot_accuracy(results: dict[str, Any], out: Path) -> Path:
  """(3) Test accuracy per epoch, mean over seeds (band: min to max)."""
  plt = _pyplot()
  fig, panels = _grid(plt, results, "Test accuracy during QAT")
  def percent(run):
    epoch, accuracy, _ = _per_evaluation(run, "test_accuracy")
    return epoch, 100 * accuracy

  for bits, ax in panels:
    _over_seeds(ax, results, bits, percent)
    _finish(ax, _name(results, bits), "epoch", "test accuracy (%)")
  return _save(fig, out, "accuracy.png")


def plot_weight_changes(results: dict[str, Any], out: Path) -> Path:
  """(4) Quantized-weight change per step, and distance to transition points."""
  plt = _pyplot()
  bits_list = _bits(results)
  fig, axes = plt.subplots(3, len(bits_list), figsize=(5.5 * len(bits_list), 11),
                           squeeze=False)
  fig.suptitle("Quantized weights: change per step and distance to transition points")
  for col, bits in enumerate(bits_list):
    ax_k, ax_h, ax_m = axes[0][col], axes[1][col], axes[2][col]
    for method in ("sgd", "talr"):
      runs = _runs(results, bits, method)
      if not runs:
        continue
      k = np.asarray(runs[0]["trace"]["k"])
      ax_k.plot(np.arange(len(k)), k, color=_COLORS[method], lw=0.6, alpha=0.7,
                label=f"{_label(results, method)}: k per step")
      hist = runs[0]["md2tp_histogram"]
      edges = np.asarray(hist["edges"])
      centers = 0.5 * (edges[1:] + edges[:-1])
      dens = np.asarray(hist["density"])
      ax_h.step(centers, dens, where="mid", color=_COLORS[method],
                label=f"{_label(results, method)} (mean {hist['mean']:.3f})")
      x, _, x_label = _per_evaluation(runs[0], "md2tp_mean")
      means = np.array([_per_evaluation(r, "md2tp_mean")[1] for r in runs])
      ax_m.plot(x, means.mean(0), color=_COLORS[method],
                label=f"{_label(results, method)} ({len(runs)} seeds)")
    ax_k.set_yscale("symlog", linthresh=1e-4)
    name = _name(results, bits)
    _finish(ax_k, f"{name}: fraction of quantized weights changing level",
            "training step", "k")
    _finish(ax_h, f"{name}: distance to nearest transition point, end of QAT",
            "normalised distance (0 = on a transition point)", "density")
    _finish(ax_m, f"{name}: mean distance to nearest transition point", x_label,
            "mean normalised distance")
  return _save(fig, out, "weight_changes.png")


def plot_oscillations(results: dict[str, Any], out: Path) -> Path:
  """(5) Mean oscillation frequency of the quantized weights, baseline vs TALR."""
  plt = _pyplot()
  fig, panels = _grid(plt, results, "Weight oscillations (flips back to the previous level)")

  def frequency(run):
    return np.arange(1, len(run["trace"]["osc"]) + 1), np.asarray(run["trace"]["osc"])

  for bits, ax in panels:
    _over_seeds(ax, results, bits, frequency)
    _finish(ax, _name(results, bits), "training step",
            "mean oscillation frequency (EMA, m = 0.99)")
  return _save(fig, out, "oscillations.png")


def plot_bits_per_byte(results: dict[str, Any], out: Path) -> Path:
  """(3, language model) Validation bits per byte per evaluation, mean over seeds."""
  plt = _pyplot()
  fig, panels = _grid(plt, results, "Validation bits per byte during QAT")
  for bits, ax in panels:
    _over_seeds(ax, results, bits, lambda run: _per_evaluation(run, "bits_per_byte")[:2],
                marker=".")
    fp = results["pretraining"]["final_bits_per_byte"]
    ax.axhline(fp, color="black", ls=":", lw=1.0, label=f"full precision ({fp:.3f})")
    # Zoom on the end and the full-precision level: the first evaluations
    # (just after quantizing) are far above and would squash them.
    levels = [fp] + [r["final_bits_per_byte"] for r in results["runs"] if r["bits"] == bits]
    pad = max(max(levels) - min(levels), 0.01)
    ax.set_ylim(min(levels) - pad / 2, max(levels) + 3 * pad)
    _finish(ax, _name(results, bits), "training step", "validation bits per byte")
  return _save(fig, out, "bits_per_byte.png")


def plot_sweep(results: dict[str, Any], out: Path) -> Path:
  """(6, language model) The baseline's learning-rate sweep against TALR (seed 0)."""
  plt = _pyplot()
  fig, panels = _grid(plt, results, "Baseline learning-rate sweep (seed 0)")
  for bits, ax in panels:
    sweep = [row for row in results["sweep"] if row["bits"] == bits]
    lrs = [row["learning_rate"] for row in sweep]
    ax.plot(lrs, [row["final_bits_per_byte"] for row in sweep], color=_COLORS["sgd"],
            marker="o", label=f"{_label(results, 'sgd')}, cosine learning rate")
    best = min(sweep, key=lambda row: row["final_bits_per_byte"])
    ax.plot([best["learning_rate"]], [best["final_bits_per_byte"]], color="tab:red",
            marker="*", markersize=12, ls="none", label="chosen")
    talr = [r for r in _runs(results, bits, "talr") if r["seed"] == 0]
    if talr:
      ax.axhline(talr[0]["final_bits_per_byte"], color=_COLORS["talr"],
                 label=f"{_label(results, 'talr')} (base rate {talr[0]['learning_rate']:g})")
    ax.set_xscale("log")
    _finish(ax, _name(results, bits), "peak learning rate of the quantized weights",
            "final validation bits per byte")
  return _save(fig, out, "lr_sweep.png")


def plot_all(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
  """Writes the figures of a demo run to ``out_dir``; returns their paths.

  Five for the image tasks (rate tracking, learning rates, accuracy, weight
  changes, oscillations); six for the language model (bits per byte in place
  of accuracy, and the baseline's learning-rate sweep).
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  score = plot_bits_per_byte if results["config"].get("task") == "lm" else plot_accuracy
  figures = [
      plot_rate_tracking(results, out),
      plot_learning_rates(results, out),
      score(results, out),
      plot_weight_changes(results, out),
      plot_oscillations(results, out),
  ]
  if "sweep" in results:
    figures.append(plot_sweep(results, out))
  return figures
