"""Figures of a demo run (matplotlib), each readable on its own.

Every function takes the ``results`` dict that :func:`talr_optax.demo.run` writes to
``results.json`` and saves one PNG. Traces are drawn for seed 0 of each bit
width; accuracy curves show the mean over seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    _finish(ax, f"W{bits}A{bits}", "training step", "fraction of quantized weights changing level")
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
    _finish(ax, f"W{bits}A{bits}", "training step", "learning rate")
  return _save(fig, out, "learning_rates.png")


def plot_accuracy(results: dict[str, Any], out: Path) -> Path:
  """(3) Test accuracy per epoch, mean over seeds (band: min to max)."""
  plt = _pyplot()
  fig, panels = _grid(plt, results, "Test accuracy during QAT")
  for bits, ax in panels:
    for method in ("sgd", "talr"):
      runs = _runs(results, bits, method)
      if not runs:
        continue
      acc = 100 * np.array([r["test_accuracy_per_epoch"] for r in runs])
      epoch = np.arange(1, acc.shape[1] + 1)
      ax.plot(epoch, acc.mean(0), color=_COLORS[method],
              label=f"{_label(results, method)} ({len(runs)} seeds)")
      ax.fill_between(epoch, acc.min(0), acc.max(0), color=_COLORS[method], alpha=0.2)
    _finish(ax, f"W{bits}A{bits}", "epoch", "test accuracy (%)")
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
      means = np.array([r["md2tp_mean_per_epoch"] for r in runs])
      ax_m.plot(np.arange(1, means.shape[1] + 1), means.mean(0), color=_COLORS[method],
                label=f"{_label(results, method)} ({len(runs)} seeds)")
    ax_k.set_yscale("symlog", linthresh=1e-4)
    name = f"W{bits}A{bits}"
    _finish(ax_k, f"{name}: fraction of quantized weights changing level",
            "training step", "k")
    _finish(ax_h, f"{name}: distance to nearest transition point, end of QAT",
            "normalised distance (0 = on a transition point)", "density")
    _finish(ax_m, f"{name}: mean distance to nearest transition point", "epoch",
            "mean normalised distance")
  return _save(fig, out, "weight_changes.png")


def plot_all(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
  """Writes the four figures of a demo run to ``out_dir``; returns their paths."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  return [
      plot_rate_tracking(results, out),
      plot_learning_rates(results, out),
      plot_accuracy(results, out),
      plot_weight_changes(results, out),
  ]
