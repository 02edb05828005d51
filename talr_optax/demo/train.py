"""Training: the full-precision pretraining, and one QAT run epoch by epoch.

The image tasks' training, for :mod:`~talr_optax.demo.runs` (which imports
this module) and for scripts that study one run. Who imports whom: this
module imports the runner's shared parts (traces, record, progress) from
:mod:`~talr_optax.demo.runner`, which never imports it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from talr_optax import nnx as tnnx
from talr_optax.demo import data, export, optim
from talr_optax.demo.config import DemoConfig
from talr_optax.demo.runner import (TRACE_KEYS, Progress, append_traces, md2tp,
                                    quantized_record, step_metrics)
from talr_optax.demo.store import Checkpoints
from talr_optax.demo.tasks import Task, make_model

_EVAL_BATCH = 500


class Interrupted(RuntimeError):
  """Raised by the ``interrupt_after`` test hook of :func:`run_qat`."""



# Module-level, with the task static: runs of one model share the compiled
# evaluation (a train step still compiles per run: each has its own optimizer).
@functools.partial(nnx.jit, static_argnums=0)
def train_step(task: Task, model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array,
               y: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One update of ``model``; returns the loss and the mean rates (see ``step_metrics``)."""
  loss, grads = nnx.value_and_grad(lambda m: task.loss(m(x), y))(model)
  optimizer.update(model, grads)
  return loss, step_metrics(optimizer.opt_state)


@functools.partial(nnx.jit, static_argnums=0)
def _hits(task: Task, model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  return task.hits(model(x), y)


def evaluate(task: Task, model: nnx.Module, split: data.Split) -> float:
  """Fraction of the labels of ``split`` that ``model`` predicts right."""
  model.eval()
  total = 0
  for x, y in data.batches(split, _EVAL_BATCH, drop_last=False):
    total += int(_hits(task, model, jnp.asarray(x), jnp.asarray(y)))
  model.train()
  return total / split.labels.size


def steps_per_epoch(cfg: DemoConfig, dataset: data.Dataset) -> int:
  return len(dataset.train.labels) // cfg.batch_size


def _epoch(cfg: DemoConfig, task: Task, dataset: data.Dataset, rng: np.random.Generator):
  return data.batches(dataset.train, cfg.batch_size, rng=rng, augment=task.augment)


def nnx_state(**objects: Any) -> dict[str, Any]:
  """The state of NNX objects as nested dicts of arrays, e.g. for a checkpoint."""
  return {name: nnx.to_pure_dict(nnx.state(obj)) for name, obj in objects.items()}


def load_nnx_state(saved: dict[str, Any], **objects: Any) -> None:
  """Puts :func:`nnx_state` of the same objects back into them, in place."""
  for name, obj in objects.items():
    state = nnx.state(obj)
    nnx.replace_by_pure_dict(state, saved[name])
    nnx.update(obj, state)


def pretrain_full_precision(cfg: DemoConfig, task: Task, dataset: data.Dataset, seed: int,
                            progress: Progress | None = None) -> nnx.Module:
  """Trains the full-precision model that QAT of this seed starts from."""
  model = make_model(cfg, None, seed, dataset.num_classes)
  total = cfg.fp_epochs * steps_per_epoch(cfg, dataset)
  optimizer = nnx.Optimizer(model, optim.full_precision(cfg, total), wrt=nnx.Param)
  rng = np.random.default_rng(10_000 + seed)
  model.train()
  for _ in range(cfg.fp_epochs):
    for x, y in _epoch(cfg, task, dataset, rng):
      train_step(task, model, optimizer, jnp.asarray(x), jnp.asarray(y))
    if progress is not None:
      progress.advance(1)
  return model


@dataclasses.dataclass
class RunLog:
  """What a QAT run has recorded so far; saved with each of its checkpoints."""

  traces: dict[str, list[float]] = dataclasses.field(
      default_factory=lambda: {key: [] for key in TRACE_KEYS})
  accs: list[float] = dataclasses.field(default_factory=list)
  md2tp_means: list[float] = dataclasses.field(default_factory=list)

  def to_json(self, rng: np.random.Generator) -> dict[str, Any]:
    return {"traces": self.traces, "accs": self.accs, "md2tp_means": self.md2tp_means,
            "rng": rng.bit_generator.state}

  @classmethod
  def from_json(cls, meta: dict[str, Any], rng: np.random.Generator) -> "RunLog":
    """The log saved by :meth:`to_json`; puts ``rng`` back where it was."""
    rng.bit_generator.state = meta["rng"]
    return cls(meta["traces"], meta["accs"], meta["md2tp_means"])


@dataclasses.dataclass
class QatRun:
  """The moving parts of one QAT run."""

  task: Task
  model: nnx.Module
  optimizer: nnx.Optimizer
  lr: Callable[[int], Any]
  target: Callable[[int], Any]
  r0: float
  rng: np.random.Generator


def setup_qat(cfg: DemoConfig, task: Task, dataset: data.Dataset, fp_model: nnx.Module,
              bits: int, seed: int, method: str) -> QatRun:
  """A QAT run of ``method`` from ``fp_model``: calibrated, its optimizer built, in train mode."""
  model = make_model(cfg, bits, seed, dataset.num_classes)
  tnnx.load_full_precision(model, fp_model)
  first_x, _ = next(data.batches(dataset.train, cfg.batch_size,
                                 rng=np.random.default_rng(seed)))
  tnnx.calibrate(model, jnp.asarray(first_x))
  total = cfg.epochs * steps_per_epoch(cfg, dataset)
  optimizer = nnx.Optimizer(model, optim.qat(cfg, model, method, bits, total), wrt=nnx.Param)
  r0, target = optim.target(cfg, bits, total)
  model.train()
  return QatRun(task, model, optimizer, optim.learning_rate(cfg, total), target, r0,
                np.random.default_rng(seed))


def train_epoch(run: QatRun, cfg: DemoConfig, dataset: data.Dataset,
                traces: dict[str, list[float]]) -> None:
  """One epoch; appends a value per step to each trace (see ``runner.append_traces``)."""
  pending = [train_step(run.task, run.model, run.optimizer, jnp.asarray(x), jnp.asarray(y))
             for x, y in _epoch(cfg, run.task, dataset, run.rng)]
  # One transfer per epoch, not per step.
  append_traces(traces, jax.device_get(pending), run.lr, run.target)


def _record(run: QatRun, log: RunLog, bits: int, seed: int, method: str) -> dict[str, Any]:
  """The run's entry of ``results.json``."""
  return {
      "bits": bits,
      "seed": seed,
      "method": method,
      "final_test_accuracy": log.accs[-1],
      "test_accuracy_per_epoch": log.accs,
      "md2tp_mean_per_epoch": log.md2tp_means,
      **quantized_record(run.model, log.traces, run.r0),
      "trace": log.traces,
  }


def _status(cfg: DemoConfig, log: RunLog, loss: float) -> str:
  return (f"epoch {len(log.accs)}/{cfg.epochs} loss {loss:.3f} acc {100 * log.accs[-1]:.1f}% "
          f"U {log.traces['U'][-1]:.3g} K {log.traces['K'][-1]:.2e}")


def _resume(run: QatRun, checkpoints: Checkpoints) -> RunLog:
  _, saved, meta = checkpoints.restore(nnx_state(model=run.model, optimizer=run.optimizer))
  load_nnx_state(saved, model=run.model, optimizer=run.optimizer)
  return RunLog.from_json(meta, run.rng)


def run_qat(cfg: DemoConfig, task: Task, dataset: data.Dataset, fp_model: nnx.Module,
            bits: int, seed: int, method: str, *, progress: Progress | None = None,
            checkpoints: Checkpoints | None = None, interrupt_after: int | None = None
            ) -> dict[str, Any]:
  """One QAT run from ``fp_model``; returns its record for ``results.json``.

  With ``checkpoints`` the model, optimizer state, traces and data order are
  saved after every epoch, and a run that has a checkpoint resumes from its
  latest one, bit for bit. ``interrupt_after`` raises :class:`Interrupted`
  once the run has trained that many epochs in this call, as a crash would
  (a hook for tests of resuming).
  """
  run = setup_qat(cfg, task, dataset, fp_model, bits, seed, method)
  log = RunLog()
  if checkpoints is not None and checkpoints.latest_step() is not None:
    log = _resume(run, checkpoints)
    if progress is not None:
      progress.advance(len(log.accs), _status(cfg, log, float("nan")))
  start = len(log.accs)
  for epoch in range(start, cfg.epochs):
    if interrupt_after is not None and epoch - start >= interrupt_after:
      raise Interrupted(f"interrupted after epoch {epoch}")
    train_epoch(run, cfg, dataset, log.traces)
    log.accs.append(evaluate(task, run.model, dataset.test))
    log.md2tp_means.append(float(np.mean(md2tp(run.model))))
    if checkpoints is not None:
      checkpoints.save(epoch + 1, nnx_state(model=run.model, optimizer=run.optimizer),
                       log.to_json(run.rng))
    if progress is not None:
      last = log.traces["loss"][-steps_per_epoch(cfg, dataset):]
      progress.advance(1, _status(cfg, log, float(np.mean(last))))
  record = _record(run, log, bits, seed, method)
  if method == "talr":
    record["export"] = export.export_report(
        run.model, make_model(cfg, bits, seed, dataset.num_classes),
        lambda model: evaluate(task, model, dataset.test), log.accs[-1])
  return record
