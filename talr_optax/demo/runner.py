"""The runner every task shares: one run per arm, the record, summary, output.

A task (a :class:`TaskDef`: the image classifiers' ``runs.TASK``, the
language model's ``lm_runs.TASK``) contributes its data, model, optimizer
arms and training step, and the order of its runs. The runner holds what does
not depend on the task, once:

* :func:`append_traces`: the per-step traces (``k``, ``K``, ``R``, ``U``,
  ``lr``, ``loss``, ``osc``) from the metrics of the compiled steps;
* :func:`quantized_record`: tracking error, late oscillation frequency and
  the md2tp histogram of a finished QAT run;
* :func:`summarize`: mean and spread over seeds per (bits, method);
* :class:`Progress`: a bar on a terminal, plain lines in a file or a pipe;
* :func:`run`: load, train (the task's procedure), summarise, write
  ``results.json`` (readable by everyone, as the figures) and the figures,
  print the tables;
* :func:`train_arm`: one arm of one task for one seed, from a pretrained
  model, for scripts that study the demo's runs (see its docstring).

Who imports whom: the task modules (:mod:`~talr_optax.demo.runs`,
:mod:`~talr_optax.demo.lm_runs`) and their training modules
(:mod:`~talr_optax.demo.train`, :mod:`~talr_optax.demo.lm_train`) import this
module; it imports none of them (only :mod:`~talr_optax.demo.export`,
:mod:`~talr_optax.demo.plots`, :mod:`~talr_optax.demo.store` and
:mod:`~talr_optax.demo.config`), so :func:`run` and :func:`train_arm` take the
task itself. The command line picks a task by name
(:func:`talr_optax.demo.cli.task_of`, also ``talr_optax.demo.task_of``).

Terms printed in the tables (:data:`TERMS`):

* *md2tp*: a quantized weight's distance to its nearest transition point
  (the value where its level would change), in units of the quantization
  step: 0 on a transition point, 0.5 midway between two (binary weights'
  distances are halved to share that scale);
* *late oscillation frequency*: the oscillation monitor's mean frequency
  (an EMA of how often a weight's level flips back to the level before)
  averaged over the last :data:`LATE_FRACTION` of the QAT steps.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import talr_optax as talr
from talr_optax import nnx as tnnx
from talr_optax.demo import export, plots, store
from talr_optax.demo.config import METHODS

TRACE_KEYS = ("k", "K", "R", "U", "lr", "loss", "osc")
HIST_BINS = 25
# Steps at the start of a run left out of the tracking error: K starts at R_0
# and needs ~1/(1-m) steps to reflect the measured rate.
WARMUP_FRACTION = 0.1
# The end of a QAT run over which the oscillation frequency is "late".
LATE_FRACTION = 0.1
# Width of the text written to a file or a pipe: wide enough that no table
# cell wraps (a terminal uses its own width).
FILE_WIDTH = 200

TERMS = (
    "md2tp: distance of a quantized weight to its nearest transition point, in "
    "quantization steps (0: on a transition point, 0.5: midway between two)",
    f"late osc. freq.: mean oscillation frequency (how often weights flip back to their "
    f"previous level, an EMA) over the last {LATE_FRACTION:.0%} of the QAT steps",
    f"|K-R|/R0: mean distance of K (the EMA of the transition rate) to the target R after "
    f"the first {WARMUP_FRACTION:.0%} of the steps, over R_0",
)


# ---------------------------------------------------------------------------
# Per-step traces and the record of a QAT run


def step_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Mean over rate groups of k, K, R, U and the oscillation frequency ``osc``.

  Args:
    opt_state: an optimizer state holding TALR or monitor states.

  Returns:
    Scalars by name; R and U only under TALR, ``osc`` where
    ``talr.track_oscillations`` runs.
  """
  m = talr.metrics(opt_state)
  out = {}
  for name, prefix in (("k", "transition_rate/"), ("K", "ema_transition_rate/"),
                       ("R", "target_transition_rate/"), ("U", "talr/"),
                       ("osc", "mean_oscillation_frequency/")):
    values = [v for key, v in m.items() if key.startswith(prefix)]
    if values:
      out[name] = jnp.mean(jnp.stack(values))
  return out


def append_traces(traces: dict[str, list[float]], steps: Sequence[tuple[Any, dict[str, Any]]],
                  lr: Callable[[int], Any], target: Callable[[int], Any] | None,
                  lr_scale: float = 1.0) -> None:
  """Appends a value per step to each trace.

  Entry n describes the state after update n: the transitions ``k`` that
  update caused, and ``K``, ``R``, ``U`` and the schedule's ``lr`` that update
  n + 1 will use (the TALR state holds ``R(n+1)`` and ``U_(n+1)``).

  Args:
    traces: lists by :data:`TRACE_KEYS`; ``loss`` counts the steps done.
    steps: ``(loss, step_metrics)`` of each new step, on the host.
    lr: the learning-rate schedule.
    target: the target schedule; ``None`` for pretraining (only the loss
      is traced).
    lr_scale: multiple of ``lr`` the run uses (the LM baseline's sweep).
  """
  for loss, m in steps:
    step = len(traces["loss"]) + 1
    traces["loss"].append(float(loss))
    if target is None:
      continue
    lr_n = float(lr(step)) * lr_scale
    traces["lr"].append(lr_n)
    traces["k"].append(float(m["k"]))
    traces["K"].append(float(m["K"]))
    # The baseline has no target of its own: log the one TALR follows.
    traces["R"].append(float(m["R"]) if "R" in m else float(target(step)))
    traces["U"].append(float(m["U"]) if "U" in m else lr_n)
    traces["osc"].append(float(m["osc"]))


def tracking_error(traces: dict[str, list[float]], r0: float) -> float:
  """Mean ``|K - R| / R_0`` after the first :data:`WARMUP_FRACTION` of the steps."""
  K, R = np.asarray(traces["K"]), np.asarray(traces["R"])
  start = int(WARMUP_FRACTION * len(K))
  return float(np.mean(np.abs(K[start:] - R[start:])) / r0)


def late_oscillation_frequency(traces: dict[str, list[float]]) -> float:
  """Mean of the ``osc`` trace over the last :data:`LATE_FRACTION` of the steps (at least one)."""
  osc = traces["osc"]
  return float(np.mean(osc[-max(1, int(len(osc) * LATE_FRACTION)):]))


def md2tp(model: Any) -> np.ndarray:
  """Distance of every quantized weight to its nearest transition point (see :data:`TERMS`)."""
  parts = []
  for _, layer in tnnx.quantized_layers(model):
    if layer.weight_bits is None:
      continue
    # weight_scale_for: per-layer scales shaped to broadcast over a stacked kernel.
    d = talr.distance_to_transition(layer.kernel[...], layer.weight_scale_for(),
                                    layer.weight_bits)
    # Binary distances live in [0, 1]; halve them to share the [0, 0.5] axis.
    parts.append(np.asarray(d).ravel() * (0.5 if layer.weight_bits == 1 else 1.0))
  return np.concatenate(parts)


def quantized_record(model: Any, traces: dict[str, list[float]], r0: float) -> dict[str, Any]:
  """What every task records of a finished QAT run, beyond its score.

  Args:
    model: the trained quantized model.
    traces: its per-step traces (:func:`append_traces`).
    r0: the target's ``R_0``.

  Returns:
    ``tracking_error``, ``r0``, ``late_oscillation_frequency`` and
    ``md2tp_histogram`` (``edges``, ``density`` over [0, 0.5], ``mean``).
  """
  d = md2tp(model)
  counts, edges = np.histogram(d, bins=HIST_BINS, range=(0.0, 0.5), density=True)
  return {
      "tracking_error": tracking_error(traces, r0),
      "r0": r0,
      "late_oscillation_frequency": late_oscillation_frequency(traces),
      "md2tp_histogram": {"edges": edges.tolist(), "density": counts.tolist(),
                          "mean": float(np.mean(d))},
  }


# ---------------------------------------------------------------------------
# Summary over seeds


class Score(NamedTuple):
  """How a task scores a run.

  Attributes:
    name: summary keys ``{name}_mean`` and ``{name}_std``.
    key: the record's final score.
    label: the table's column.
    scale: the summary shows ``scale * score`` (100: a percentage).
    digits: decimals in the table.
  """

  name: str
  key: str
  label: str
  scale: float = 1.0
  digits: int = 2


def summarize(runs: list[dict[str, Any]], score: Score, *, descending_bits: bool = False
              ) -> list[dict[str, Any]]:
  """One row per (bits, method): the score's mean and std over seeds and the means of the rest.

  Args:
    runs: the records of the QAT runs.
    score: the task's score.
    descending_bits: rows from the widest bit width down.

  Returns:
    Rows with ``bits``, ``method``, ``seeds``, the score's mean and std,
    ``tracking_error_mean``, ``late_oscillation_frequency_mean``,
    ``md2tp_mean``, and ``learning_rate`` where the records have one.
  """
  rows = []
  for bits in sorted({r["bits"] for r in runs}, reverse=descending_bits):
    for method in METHODS:
      sel = [r for r in runs if r["bits"] == bits and r["method"] == method]
      if not sel:
        continue
      values = score.scale * np.array([r[score.key] for r in sel])
      row = {"bits": bits, "method": method, "seeds": len(sel)}
      if "learning_rate" in sel[0]:
        row["learning_rate"] = sel[0]["learning_rate"]
      mean = lambda key: float(np.mean([r[key] for r in sel]))  # noqa: E731
      rows.append(row | {
          f"{score.name}_mean": float(values.mean()), f"{score.name}_std": float(values.std()),
          "tracking_error_mean": mean("tracking_error"),
          "late_oscillation_frequency_mean": mean("late_oscillation_frequency"),
          "md2tp_mean": float(np.mean([r["md2tp_histogram"]["mean"] for r in sel])),
      })
  return rows


# ---------------------------------------------------------------------------
# Output: console, progress, tables


def console() -> Any:
  """A rich ``Console``: the terminal's width, or :data:`FILE_WIDTH` in a file or a pipe."""
  from rich.console import Console  # pylint: disable=import-outside-toplevel
  c = Console()
  return c if c.is_terminal else Console(width=FILE_WIDTH)


class Progress:
  """Progress of a whole demo: a bar on a terminal, plain lines in a file or a pipe.

  In a file a bar would leave a redrawn line per refresh; there each
  :meth:`advance` with a status prints one line instead.

  Args:
    total: units of work of the whole demo.
    unit: their name (``"epochs"``, ``"steps"``).
  """

  def __init__(self, total: int, unit: str):
    self._console = console()
    self._total, self._unit, self._done, self._text = total, unit, 0, ""
    self._bar = None
    if self._console.is_terminal:
      from rich import progress as rp  # pylint: disable=import-outside-toplevel
      self._bar = rp.Progress(
          rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
          rp.TimeElapsedColumn(), rp.TextColumn("{task.fields[status]}"),
          console=self._console)
      self._task = self._bar.add_task(unit, total=total, status="")

  def __enter__(self) -> "Progress":
    if self._bar is not None:
      self._bar.__enter__()
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._bar is not None:
      self._bar.__exit__(*exc)

  def describe(self, text: str) -> None:
    """Names the work that follows."""
    self._text = text
    if self._bar is not None:
      self._bar.update(self._task, description=text)
    else:
      self._line(text)

  def advance(self, n: int = 1, status: str = "") -> None:
    """Counts ``n`` units done; ``status`` says where the current run is."""
    self._done += n
    if self._bar is not None:
      self._bar.update(self._task, advance=n, **({"status": status} if status else {}))
    elif status:
      self._line(f"{self._text}: {status}")

  def _line(self, text: str) -> None:
    width = len(str(self._total))
    print(f"[{self._done:>{width}}/{self._total} {self._unit}] {text}", flush=True)


def summary_table(title: str, rows: list[dict[str, Any]], score: Score,
                  bits_name: Callable[[int], str], labels: dict[str, str]) -> None:
  """Prints the rows of :func:`summarize` as a table (:func:`print_terms` explains its terms)."""
  from rich.table import Table  # pylint: disable=import-outside-toplevel
  out = console()
  table = Table()
  with_lr = any("learning_rate" in r for r in rows)
  columns = ("bits", "optimizer") + (("peak lr",) if with_lr else ()) + (
      "seeds", score.label, "mean |K-R|/R0", "late osc. freq.", "mean md2tp")
  for col in columns:
    table.add_column(col, justify="right", no_wrap=True)
  d = score.digits
  for r in rows:
    cells = [bits_name(r["bits"]), labels[r["method"]]]
    if with_lr:
      cells.append(f"{r['learning_rate']:.1e}")
    cells += [str(r["seeds"]),
              f"{r[f'{score.name}_mean']:.{d}f} ± {r[f'{score.name}_std']:.{d}f}",
              f"{r['tracking_error_mean']:.3f}", f"{r['late_oscillation_frequency_mean']:.2e}",
              f"{r['md2tp_mean']:.3f}"]
    table.add_row(*cells)
  print_table(title, table)


def print_table(title: str, table: Any) -> None:
  """Prints ``title`` on a line of its own (never wrapped into the table's width), then ``table``."""
  out = console()
  out.print(title, soft_wrap=True)
  out.print(table)


def print_terms() -> None:
  """Prints what the tables' terms mean (:data:`TERMS`)."""
  out = console()
  for term in TERMS:
    out.print(term, soft_wrap=True)


# ---------------------------------------------------------------------------
# Tasks and the whole run


@dataclasses.dataclass(frozen=True)
class TaskDef:
  """What a task contributes to the runner.

  Attributes:
    name: the ``--task`` value.
    unit: what the progress counts (``"epochs"``, ``"steps"``).
    total: ``total(cfg)``: units of the whole demo.
    load: ``load(cfg)``: the data every run of the task shares; raises
      ``FileNotFoundError``/``ValueError`` for missing or corrupt files and
      ``UsageError`` for a flag that does not fit the data, before any
      training.
    pretrain: ``pretrain(cfg, data, seed, progress)``: the full-precision
      model QAT starts from (``progress`` may be ``None``).
    train_arm: ``train_arm(cfg, data, fp_model, bits, seed, method, lr_scale,
      progress)``: one QAT run, its record for ``results.json``.
    procedure: ``procedure(cfg, data, progress)``: every run of the demo,
      as ``(records, extra)``; ``extra`` joins ``results.json``.
    score: how a run is scored.
    descending_bits: summary rows from the widest bit width down.
    print_tables: ``print_tables(cfg, results)`` after the run.
  """

  name: str
  unit: str
  total: Callable[[Any], int]
  load: Callable[[Any], Any]
  pretrain: Callable[..., Any]
  train_arm: Callable[..., dict[str, Any]]
  procedure: Callable[[Any, Any, Progress], tuple[list[dict[str, Any]], dict[str, Any]]]
  score: Score
  print_tables: Callable[[Any, dict[str, Any]], None]
  descending_bits: bool = False


def _check_task(task: Any) -> TaskDef:
  """``task`` if it is a :class:`TaskDef`; a name gets the way to look it up."""
  if not isinstance(task, TaskDef):
    raise TypeError(
        f"task must be a TaskDef (runs.TASK or lm_runs.TASK), got {task!r}; to name a task "
        "('digits' or 'lm') use talr_optax.demo.task_of, run or train_arm")
  return task


def train_arm(task: TaskDef, cfg: Any, data: Any, fp_model: Any, *, bits: int,
              seed: int, method: str, lr_scale: float = 1.0,
              progress: Progress | None = None) -> dict[str, Any]:
  """One arm of a task for one seed: a QAT run from a pretrained model.

  The same run the demo makes (model, calibration, optimizer, data order,
  traces), for scripts that study it. :func:`talr_optax.demo.cli.train_arm`
  (also ``talr_optax.demo.train_arm``) takes the task by name and has an
  example.

  Args:
    task: the task, a :class:`TaskDef` (``runs.TASK``, ``lm_runs.TASK``).
    cfg: the task's settings (``DemoConfig`` or ``LMConfig``); the run's
      length is ``cfg.epochs`` or ``cfg.steps``.
    data: ``task.load(cfg)``.
    fp_model: ``task.pretrain(...)``'s model; not modified.
    bits: weight (and, on images, activation) bits.
    seed: seed of the data order (and of the quantized model's fresh
      parameters, replaced by ``fp_model``'s).
    method: ``"sgd"`` (the baseline: SGD, Adam or AdamW with a cosine
      learning rate) or ``"talr"``.
    lr_scale: the baseline's multiple of the base learning rate (language
      model only; the image tasks take 1).
    progress: shows the run's progress (``None``: silent).

  Returns:
    The run's record, as in ``results.json``'s ``runs``: the final score
    (``final_test_accuracy`` or ``final_bits_per_byte``), its per-evaluation
    values, ``trace`` (per step: ``k``, ``K``, ``R``, ``U``, ``lr``,
    ``loss``, ``osc``) and :func:`quantized_record`'s entries.

  Raises:
    TypeError: ``task`` is not a :class:`TaskDef` (a name, say).
    ValueError: an unknown method, or ``lr_scale`` != 1 on images.
  """
  task = _check_task(task)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  return task.train_arm(cfg, data, fp_model, bits, seed, method, lr_scale, progress)


def _load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:  # pragma: no cover - not on every platform
    return None


def run(task: TaskDef, cfg: Any, **procedure_kwargs: Any) -> dict[str, Any]:
  """Runs a whole demo; writes ``results.json`` and the figures to ``cfg.out``.

  Args:
    task: the task, a :class:`TaskDef` (``runs.TASK``, ``lm_runs.TASK``;
      :func:`talr_optax.demo.cli.run` picks it from ``cfg``).
    cfg: its settings, a ``DemoConfig`` (image tasks) or an ``LMConfig``.
    **procedure_kwargs: passed to the task's procedure (test hooks).

  Returns:
    The results, as written to ``results.json``.

  Raises:
    TypeError: ``task`` is not a :class:`TaskDef`.
    UsageError: a flag does not fit the data (checked before any training).
    FileNotFoundError, ValueError: missing or corrupt data or checkpoints.
  """
  task = _check_task(task)
  start, load_start = time.perf_counter(), _load_average()
  data = task.load(cfg)
  with Progress(task.total(cfg), task.unit) as progress:
    records, extra = task.procedure(cfg, data, progress, **procedure_kwargs)
  results = {
      "config": {**dataclasses.asdict(cfg), "method_labels": cfg.labels, **extra.pop("config", {})},
      **extra,
      "summary": summarize(records, task.score, descending_bits=task.descending_bits),
      "runs": records,
      "seconds": time.perf_counter() - start,
      "load_average": {"start": load_start, "end": _load_average()},
      "versions": {"jax": jax.__version__, "optax": optax.__version__,
                   "talr_optax": talr.__version__},
  }
  out = Path(cfg.out)
  store.write_json_atomic(out / "results.json", results)
  figures = plots.plot_all(results, out)
  task.print_tables(cfg, results)
  export.print_reports(records, task.score.name.replace("_", " "))
  print_terms()
  print(f"wrote {out / 'results.json'} and {len(figures)} figures to {out}/ "
        f"in {results['seconds']:.0f} s")
  return results
