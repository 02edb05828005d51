"""The demo's last step: export the final TALR model and score its integer forward.

:func:`export_report` turns a trained QAT model into its integer export
(:func:`talr_optax.nnx.export_integer_model`), serves the export with
:func:`talr_optax.nnx.integer_model` (int32 accumulation; nothing is read from
the trained model) and scores both, so the record shows that the integers
that ship are the model that was trained. :func:`print_reports` prints one
line per exported run.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from talr_optax import nnx as tnnx


def _array_bytes(tree: Any) -> int:
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _packed_bytes(exported: dict[str, Any]) -> int:
  """Bytes with each layer's levels packed at its bit width, other arrays as stored."""
  total = 0

  def visit(tree: Any) -> None:
    nonlocal total
    for key, value in tree.items():
      if isinstance(value, dict):
        visit(value)
      elif key == "kernel_levels":
        total += math.ceil(value.size * tree["weight_bits"] / 8)
      elif hasattr(value, "dtype"):
        total += np.asarray(value).nbytes

  visit(exported["params"])
  return total


def export_report(model: nnx.Module, fresh_model: nnx.Module,
                  score: Callable[[nnx.Module], float], qat_score: float) -> dict[str, Any]:
  """Exports ``model``, serves the export in integers and scores the integer model.

  Args:
    model: the trained QAT model.
    fresh_model: a model of the same architecture (its values are not used).
    score: ``score(model) -> float``, e.g. test accuracy or bits per byte.
    qat_score: ``score(model)``, which the run has just computed (not recomputed).

  Returns:
    ``float_state_bytes`` (the model's float state: params, batch statistics,
    quantizer state), ``export_bytes`` (the export as stored: int8 levels),
    ``export_packed_bytes`` (levels packed at their bit width),
    ``qat_score`` and ``integer_score``.
  """
  exported = tnnx.export_integer_model(model)
  serving = tnnx.integer_model(exported, fresh_model)
  return {
      "float_state_bytes": _array_bytes(nnx.state(model)),
      "export_bytes": _array_bytes(exported),
      "export_packed_bytes": _packed_bytes(exported),
      "qat_score": qat_score,
      "integer_score": score(serving),
  }


def print_reports(records: list[dict[str, Any]], score_name: str, digits: int = 4) -> None:
  """One line per record with an ``"export"`` entry (see :func:`export_report`)."""
  for r in records:
    e = r.get("export")
    if e is None:
      continue
    print(f"export W{r['bits']} seed {r['seed']}: {e['export_bytes']:,} bytes as int8 "
          f"({e['export_packed_bytes']:,} packed at {r['bits']} bit/weight) vs "
          f"{e['float_state_bytes']:,} bytes of float state; {score_name} "
          f"QAT {e['qat_score']:.{digits}f}, integer forward {e['integer_score']:.{digits}f}")
