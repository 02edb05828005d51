"""The whole demo: every seed, bit width and method; then results and figures."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import optax

import talr_optax as talr
from talr_optax.demo import data, export, plots, store, summary, train
from talr_optax.demo.config import METHODS, DemoConfig
from talr_optax.demo.tasks import TASKS, Task, check_batch_size, make_model


class _Bar:
  """The progress bar: one tick per epoch of pretraining or QAT."""

  def __init__(self, cfg: DemoConfig):
    from rich import progress as rp  # pylint: disable=import-outside-toplevel
    self._cfg = cfg
    self._bar = rp.Progress(
        rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(), rp.TextColumn("{task.fields[status]}"))
    total = cfg.seeds * (cfg.fp_epochs + 2 * len(cfg.bits) * cfg.epochs)
    self._task = self._bar.add_task("epochs", total=total, status="")

  def __enter__(self) -> "_Bar":
    self._bar.__enter__()
    return self

  def __exit__(self, *exc: Any) -> None:
    self._bar.__exit__(*exc)

  def advance(self, epochs: int = 1) -> None:
    self._bar.advance(self._task, epochs)

  def describe(self, text: str) -> None:
    self._bar.update(self._task, description=text)

  def report(self, epoch: int, loss: float, acc: float, U: float, K: float,
             advance: int = 1) -> None:
    """The ``progress`` callback of :func:`train.run_qat`."""
    self._bar.update(self._task, advance=advance, status=(
        f"epoch {epoch}/{self._cfg.epochs} loss {loss:.3f} acc {100 * acc:.1f}% "
        f"U {U:.3g} K {K:.2e}"))


def _full_precision(cfg: DemoConfig, task: Task, dataset: data.Dataset, seed: int,
                    run_store: store.RunStore | None, bar: _Bar):
  """The pretrained model of ``seed``: read from the store, or trained (and stored)."""
  if run_store is None:
    return train.pretrain_full_precision(cfg, task, dataset, seed, bar.advance)
  with run_store.full_precision_checkpoints(seed) as checkpoints:
    if checkpoints.latest_step() is None:
      model = train.pretrain_full_precision(cfg, task, dataset, seed, bar.advance)
      checkpoints.save(cfg.fp_epochs, train.nnx_state(model=model), meta={})
      return model
    model = make_model(cfg, None, seed, dataset.num_classes)
    _, saved, _ = checkpoints.restore(train.nnx_state(model=model))
    train.load_nnx_state(saved, model=model)
    bar.advance(cfg.fp_epochs)
    return model


def _qat(cfg: DemoConfig, task: Task, dataset: data.Dataset, fp_model: Any, bits: int,
         seed: int, method: str, run_store: store.RunStore | None, bar: _Bar,
         interrupt_after: int | None) -> dict[str, Any]:
  bar.describe(f"seed {seed} W{bits}A{bits} {cfg.labels[method]:>5}")
  checkpoints = run_store.run_checkpoints(bits, seed, method) if run_store else None
  with checkpoints or contextlib.nullcontext():
    record = train.run_qat(cfg, task, dataset, fp_model, bits, seed, method,
                           progress=bar.report, checkpoints=checkpoints,
                           interrupt_after=interrupt_after)
  if run_store is not None:
    run_store.save_finished(bits, seed, method, record)
  return record


def _seed(cfg: DemoConfig, task: Task, dataset: data.Dataset, seed: int,
          run_store: store.RunStore | None, bar: _Bar, interrupt_after: int | None
          ) -> list[dict[str, Any]]:
  """The records of every run of ``seed``: finished ones read back, others trained."""
  keys = [(bits, method) for bits in cfg.bits for method in METHODS]
  records = {(b, m): run_store.finished(b, seed, m) if run_store else None for b, m in keys}
  todo = [key for key in keys if records[key] is None]
  bar.advance(cfg.epochs * (len(keys) - len(todo)))
  if not todo:
    bar.advance(cfg.fp_epochs)
    return [records[key] for key in keys]
  bar.describe(f"seed {seed}: full-precision pretraining")
  fp_model = _full_precision(cfg, task, dataset, seed, run_store, bar)
  for bits, method in todo:
    records[bits, method] = _qat(cfg, task, dataset, fp_model, bits, seed, method,
                                 run_store, bar, interrupt_after)
  return [records[key] for key in keys]


def _results(cfg: DemoConfig, records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
  return {
      "config": {**dataclasses.asdict(cfg), "method_labels": cfg.labels},
      "summary": summary.summarize(records),
      "runs": records,
      "seconds": seconds,
      "versions": {"jax": jax.__version__, "optax": optax.__version__,
                   "talr_optax": talr.__version__},
  }


def run(cfg: DemoConfig, *, interrupt_after: int | None = None) -> dict[str, Any]:
  """Runs the whole demo; writes ``results.json`` and the figures to ``cfg.out``.

  Raises:
    UsageError: a flag does not fit the data (checked before any training).
    FileNotFoundError, ValueError: missing or corrupt data or checkpoints.
    train.Interrupted: from ``interrupt_after``, a hook that interrupts the
      first QAT run that trains that many epochs in this call (tests of
      resuming).
  """
  start = time.perf_counter()
  task = TASKS[cfg.dataset]
  dataset = task.load(cfg)
  check_batch_size(cfg, dataset)
  with contextlib.ExitStack() as stack:
    run_store = stack.enter_context(store.RunStore(cfg)) if cfg.checkpoint_dir else None
    bar = stack.enter_context(_Bar(cfg))
    records = [record for seed in range(cfg.seeds)
               for record in _seed(cfg, task, dataset, seed, run_store, bar, interrupt_after)]
  results = _results(cfg, records, time.perf_counter() - start)
  out = Path(cfg.out)
  store.write_json_atomic(out / "results.json", results)
  figures = plots.plot_all(results, out)
  summary.print_table(cfg, results["summary"])
  export.print_reports(records, "test accuracy")
  print(f"wrote {out / 'results.json'} and {len(figures)} figures to {out}/ "
        f"in {results['seconds']:.0f} s")
  return results
