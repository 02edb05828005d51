"""Training: the full-precision pretraining, and one QAT run epoch by epoch."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import talr_optax as talr
from talr_optax import nnx as tnnx
from talr_optax.demo import data, export, optim
from talr_optax.demo.config import DemoConfig
from talr_optax.demo.store import Checkpoints
from talr_optax.demo.tasks import Task, make_model

_HIST_BINS = 25
_EVAL_BATCH = 500
# Steps at the start of a run left out of the tracking error: K starts at R_0
# and needs ~1/(1-m) steps to reflect the measured rate.
_WARMUP_FRACTION = 0.1
TRACE_KEYS = ("k", "K", "R", "U", "lr", "loss", "osc")
# progress(epoch=, loss=, acc=, U=, K=, advance=1) after every epoch.
Progress = Callable[..., None]


class Interrupted(RuntimeError):
  """Raised by the ``interrupt_after`` test hook of :func:`run_qat`."""


def step_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Mean over rate groups of k, K, R, U and the oscillation frequency ``osc``.

  R and U only under TALR; ``osc`` where ``talr.track_oscillations`` runs.
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
                            progress: Callable[[], None] | None = None) -> nnx.Module:
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
      progress()
  return model


def md2tp(model: nnx.Module) -> np.ndarray:
  """Distance of every quantized weight to its nearest transition point."""
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
class _Qat:
  """The moving parts of one QAT run."""

  task: Task
  model: nnx.Module
  optimizer: nnx.Optimizer
  lr: Callable[[int], Any]
  target: Callable[[int], Any]
  r0: float
  rng: np.random.Generator


def _setup(cfg: DemoConfig, task: Task, dataset: data.Dataset, fp_model: nnx.Module,
           bits: int, seed: int, method: str) -> _Qat:
  model = make_model(cfg, bits, seed, dataset.num_classes)
  tnnx.load_full_precision(model, fp_model)
  first_x, _ = next(data.batches(dataset.train, cfg.batch_size,
                                 rng=np.random.default_rng(seed)))
  tnnx.calibrate(model, jnp.asarray(first_x))
  total = cfg.epochs * steps_per_epoch(cfg, dataset)
  optimizer = nnx.Optimizer(model, optim.qat(cfg, model, method, bits, total), wrt=nnx.Param)
  r0, target = optim.target(cfg, bits, total)
  model.train()
  return _Qat(task, model, optimizer, optim.learning_rate(cfg, total), target, r0,
              np.random.default_rng(seed))


def _train_epoch(run: _Qat, cfg: DemoConfig, dataset: data.Dataset,
                 traces: dict[str, list[float]]) -> None:
  """One epoch; appends a value per step to each trace.

  Entry n describes the state after update n: the transitions ``k`` that
  update caused, and ``K``, ``R``, ``U`` and the schedule's ``lr`` that update
  n + 1 will use (the TALR state holds ``R(n+1)`` and ``U_(n+1)``).
  """
  pending = [train_step(run.task, run.model, run.optimizer, jnp.asarray(x), jnp.asarray(y))
             for x, y in _epoch(cfg, run.task, dataset, run.rng)]
  step = len(traces["k"])
  for loss, m in jax.device_get(pending):  # one transfer per epoch, not per step
    step += 1
    lr = float(run.lr(step))
    traces["loss"].append(float(loss))
    traces["k"].append(float(m["k"]))
    traces["K"].append(float(m["K"]))
    # The baseline has no target of its own: log the one TALR follows.
    traces["R"].append(float(m["R"]) if "R" in m else float(run.target(step)))
    traces["lr"].append(lr)
    traces["U"].append(float(m["U"]) if "U" in m else lr)
    traces["osc"].append(float(m["osc"]))


def tracking_error(traces: dict[str, list[float]], r0: float) -> float:
  """Mean |K - R| / R_0 after the warm-up."""
  K, R = np.asarray(traces["K"]), np.asarray(traces["R"])
  start = int(_WARMUP_FRACTION * len(K))
  return float(np.mean(np.abs(K[start:] - R[start:])) / r0)


def _record(run: _Qat, log: RunLog, bits: int, seed: int, method: str) -> dict[str, Any]:
  """The run's entry of ``results.json``."""
  d = md2tp(run.model)
  counts, edges = np.histogram(d, bins=_HIST_BINS, range=(0.0, 0.5), density=True)
  return {
      "bits": bits,
      "seed": seed,
      "method": method,
      "final_test_accuracy": log.accs[-1],
      "test_accuracy_per_epoch": log.accs,
      "tracking_error": tracking_error(log.traces, run.r0),
      "r0": run.r0,
      "md2tp_mean_per_epoch": log.md2tp_means,
      "md2tp_histogram": {"edges": edges.tolist(), "density": counts.tolist(),
                          "mean": float(np.mean(d))},
      "trace": log.traces,
  }


def _resume(run: _Qat, checkpoints: Checkpoints) -> RunLog:
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
  run = _setup(cfg, task, dataset, fp_model, bits, seed, method)
  log = RunLog()
  if checkpoints is not None and checkpoints.latest_step() is not None:
    log = _resume(run, checkpoints)
    if progress is not None:
      progress(epoch=len(log.accs), loss=float("nan"), acc=log.accs[-1],
               U=log.traces["U"][-1], K=log.traces["K"][-1], advance=len(log.accs))
  start = len(log.accs)
  for epoch in range(start, cfg.epochs):
    if interrupt_after is not None and epoch - start >= interrupt_after:
      raise Interrupted(f"interrupted after epoch {epoch}")
    _train_epoch(run, cfg, dataset, log.traces)
    log.accs.append(evaluate(task, run.model, dataset.test))
    log.md2tp_means.append(float(np.mean(md2tp(run.model))))
    if checkpoints is not None:
      checkpoints.save(epoch + 1, nnx_state(model=run.model, optimizer=run.optimizer),
                       log.to_json(run.rng))
    if progress is not None:
      last = log.traces["loss"][-steps_per_epoch(cfg, dataset):]
      progress(epoch=epoch + 1, loss=float(np.mean(last)),
               acc=log.accs[-1], U=log.traces["U"][-1], K=log.traces["K"][-1])
  record = _record(run, log, bits, seed, method)
  if method == "talr":
    record["export"] = export.export_report(
        run.model, make_model(cfg, bits, seed, dataset.num_classes),
        lambda model: evaluate(task, model, dataset.test))
  return record
