"""The table of a demo: accuracy, tracking error and md2tp over seeds."""

from __future__ import annotations

from typing import Any

import numpy as np

from talr_optax.demo.config import METHODS, DemoConfig


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean ± std of final accuracy, mean tracking error and md2tp per (bits, method)."""
  rows = []
  for bits in sorted({r["bits"] for r in runs}, reverse=True):
    for method in METHODS:
      sel = [r for r in runs if r["bits"] == bits and r["method"] == method]
      if not sel:
        continue
      acc = 100 * np.array([r["final_test_accuracy"] for r in sel])
      rows.append({
          "bits": bits, "method": method, "seeds": len(sel),
          "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
          "tracking_error_mean": float(np.mean([r["tracking_error"] for r in sel])),
          "md2tp_mean": float(np.mean([r["md2tp_histogram"]["mean"] for r in sel])),
      })
  return rows


def print_table(cfg: DemoConfig, rows: list[dict[str, Any]]) -> None:
  """Prints the rows of :func:`summarize` as a table."""
  from rich.console import Console  # pylint: disable=import-outside-toplevel
  from rich.table import Table  # pylint: disable=import-outside-toplevel

  table = Table(title=f"QAT on {cfg.dataset} ({cfg.model}), {cfg.epochs} epochs, "
                      f"test accuracy over seeds")
  for col in ("bits (W/A)", "optimizer", "seeds", "test acc. (%)", "mean |K-R|/R0", "mean md2tp"):
    table.add_column(col, justify="right")
  for r in rows:
    table.add_row(f"{r['bits']}/{r['bits']}", cfg.labels[r["method"]], str(r["seeds"]),
                  f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}",
                  f"{r['tracking_error_mean']:.3f}", f"{r['md2tp_mean']:.3f}")
  Console().print(table)
