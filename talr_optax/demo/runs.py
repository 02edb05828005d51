"""The image tasks (``--dataset digits``, ``cifar10``): their runs, in the runner's terms.

Per seed: a full-precision model is pretrained, then two QAT runs (the
baseline and TALR) start from it for each bit width. With
``--checkpoint-dir`` every run is resumable (:mod:`~talr_optax.demo.store`).
The data, models and loss are in :mod:`~talr_optax.demo.tasks`, the
optimizer arms in :mod:`~talr_optax.demo.optim`, one run in
:mod:`~talr_optax.demo.train`; what every task shares (progress, record,
summary, output) in :mod:`~talr_optax.demo.runner`.

Who imports whom: this module imports the runner, :mod:`~talr_optax.demo.train`
and the modules above, and hands the runner :data:`TASK`; the runner never
imports it. :func:`talr_optax.demo.cli.task_of` imports it when a run needs it
(it imports Flax).
"""

from __future__ import annotations

import contextlib
from typing import Any

from talr_optax.demo import data, runner, store, train
from talr_optax.demo.config import METHODS, DemoConfig
from talr_optax.demo.runner import Progress
from talr_optax.demo.tasks import TASKS, Task, check_batch_size, make_model


def _load(cfg: DemoConfig) -> data.Dataset:
  dataset = TASKS[cfg.dataset].load(cfg)
  check_batch_size(cfg, dataset)
  return dataset


def _total_epochs(cfg: DemoConfig) -> int:
  return cfg.seeds * (cfg.fp_epochs + 2 * len(cfg.bits) * cfg.epochs)


def _pretrain(cfg: DemoConfig, dataset: data.Dataset, seed: int,
              progress: Progress | None) -> Any:
  return train.pretrain_full_precision(cfg, TASKS[cfg.dataset], dataset, seed, progress)


def _train_arm(cfg: DemoConfig, dataset: data.Dataset, fp_model: Any, bits: int, seed: int,
               method: str, lr_scale: float, progress: Progress | None, **kwargs: Any
               ) -> dict[str, Any]:
  if lr_scale != 1.0:
    raise ValueError(f"lr_scale must be 1 on the image tasks (their baseline has no sweep), "
                     f"got {lr_scale!r}")
  return train.run_qat(cfg, TASKS[cfg.dataset], dataset, fp_model, bits, seed, method,
                       progress=progress, **kwargs)


def _full_precision(cfg: DemoConfig, task: Task, dataset: data.Dataset, seed: int,
                    run_store: store.RunStore | None, progress: Progress):
  """The pretrained model of ``seed``: read from the store, or trained (and stored)."""
  if run_store is None:
    return train.pretrain_full_precision(cfg, task, dataset, seed, progress)
  with run_store.full_precision_checkpoints(seed) as checkpoints:
    if checkpoints.latest_step() is None:
      model = train.pretrain_full_precision(cfg, task, dataset, seed, progress)
      checkpoints.save(cfg.fp_epochs, train.nnx_state(model=model), meta={})
      return model
    model = make_model(cfg, None, seed, dataset.num_classes)
    _, saved, _ = checkpoints.restore(train.nnx_state(model=model))
    train.load_nnx_state(saved, model=model)
    progress.advance(cfg.fp_epochs)
    return model


def _qat(cfg: DemoConfig, dataset: data.Dataset, fp_model: Any, bits: int, seed: int,
         method: str, run_store: store.RunStore | None, progress: Progress,
         interrupt_after: int | None) -> dict[str, Any]:
  progress.describe(f"seed {seed} W{bits}A{bits} {cfg.labels[method]:>5}")
  checkpoints = run_store.run_checkpoints(bits, seed, method) if run_store else None
  with checkpoints or contextlib.nullcontext():
    record = _train_arm(cfg, dataset, fp_model, bits, seed, method, 1.0, progress,
                        checkpoints=checkpoints, interrupt_after=interrupt_after)
  if run_store is not None:
    run_store.save_finished(bits, seed, method, record)
  return record


def _seed(cfg: DemoConfig, dataset: data.Dataset, seed: int, run_store: store.RunStore | None,
          progress: Progress, interrupt_after: int | None) -> list[dict[str, Any]]:
  """The records of every run of ``seed``: finished ones read back, others trained."""
  keys = [(bits, method) for bits in cfg.bits for method in METHODS]
  records = {(b, m): run_store.finished(b, seed, m) if run_store else None for b, m in keys}
  todo = [key for key in keys if records[key] is None]
  progress.advance(cfg.epochs * (len(keys) - len(todo)))
  if not todo:
    progress.advance(cfg.fp_epochs)
    return [records[key] for key in keys]
  progress.describe(f"seed {seed}: full-precision pretraining")
  fp_model = _full_precision(cfg, TASKS[cfg.dataset], dataset, seed, run_store, progress)
  for bits, method in todo:
    records[bits, method] = _qat(cfg, dataset, fp_model, bits, seed, method, run_store,
                                 progress, interrupt_after)
  return [records[key] for key in keys]


def _procedure(cfg: DemoConfig, dataset: data.Dataset, progress: Progress, *,
               interrupt_after: int | None = None
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Every seed's runs (the store, if any, is open and locked meanwhile)."""
  with store.RunStore(cfg) if cfg.checkpoint_dir else contextlib.nullcontext() as run_store:
    records = [record for seed in range(cfg.seeds)
               for record in _seed(cfg, dataset, seed, run_store, progress, interrupt_after)]
  return records, {}


SCORE = runner.Score("accuracy", "final_test_accuracy", "test acc. (%)", scale=100.0)


def _print_tables(cfg: DemoConfig, results: dict[str, Any]) -> None:
  runner.summary_table(
      f"QAT on {cfg.dataset} ({cfg.model}), {cfg.epochs} epochs, test accuracy over seeds",
      results["summary"], SCORE, lambda bits: f"{bits}/{bits}", cfg.labels)


TASK = runner.TaskDef(
    name="digits", unit="epochs", total=_total_epochs, load=_load, pretrain=_pretrain,
    train_arm=_train_arm, procedure=_procedure, score=SCORE, descending_bits=True,
    print_tables=_print_tables)


def run(cfg: DemoConfig, *, interrupt_after: int | None = None) -> dict[str, Any]:
  """Runs the whole demo of an image task (see :func:`talr_optax.demo.runner.run`).

  Args:
    cfg: the settings.
    interrupt_after: a hook that raises ``train.Interrupted`` in the first
      QAT run that trains that many epochs in this call (tests of resuming).
  """
  return runner.run(TASK, cfg, interrupt_after=interrupt_after)
