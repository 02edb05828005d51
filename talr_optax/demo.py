"""Demo: QAT with a plain learning-rate schedule vs transition rate scheduling.

    python -m talr_optax.demo            # digits, small CNN, W2A2 and W1A1, 3 seeds
    python -m talr_optax.demo --quick    # one seed, few epochs: a smoke run

For each bit width and seed a full-precision model is trained briefly, then
two QAT runs start from it:

* baseline: SGD (or Adam) with a cosine learning rate on every parameter
  (transitions recorded with :func:`talr_optax.track_transitions`);
* TALR: the same optimizer, but the quantized weights move by the
  transition-adaptive learning rate that makes their transition rate follow
  the cosine target ``R_0 = 5e-3 * sqrt(b)``.

Parameter groups follow the reference setup: quantized weights, full-precision
weights (momentum 0.9, weight decay 1e-4), activation step sizes (SGD 0.01, no
momentum, no weight decay, cosine) and batch-norm parameters (no momentum, no
weight decay). Results go to ``--out``: ``results.json`` (every figure and
per-step trace) and four PNG figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import talr_optax as talr
from talr_optax import data as data_lib

METHOD_LABELS = {"sgd": "SGD", "talr": "SGDT"}
ADAM_LABELS = {"sgd": "Adam", "talr": "AdamT"}
_BASE_LR = {"sgd": 0.1, "adam": 1e-3}
_WEIGHT_DECAY = 1e-4
_ACT_SCALE_LR = 0.01
_HIST_BINS = 25
# Steps at the start of a run left out of the tracking error: K starts at R_0
# and needs ~1/(1-m) steps to reflect the measured rate.
_WARMUP_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything a demo run depends on (written to ``results.json``)."""

  dataset: str = "digits"
  model: str = "cnn"
  bits: tuple[int, ...] = (2, 1)
  seeds: int = 3
  epochs: int = 60
  fp_epochs: int = 15
  batch_size: int = 32
  optimizer: str = "sgd"
  rule: str = "multiplicative"
  lam: float = 5e-3
  data_dir: str | None = None
  out: str = "runs/demo"
  checkpoint_dir: str | None = None


# ----------------------------------------------------------------------------
# Argument parsing: every value is checked here, before any work starts.


def _positive_int(name: str) -> Callable[[str], int]:
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {text!r}") from None
    if value < 1:
      raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {value}")
    return value
  return parse


def _bits_list(text: str) -> tuple[int, ...]:
  try:
    bits = tuple(int(b) for b in text.split(",") if b.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--bits must be a comma-separated list of bit widths in 1, 2, 3, 4, 8, got {text!r}"
    ) from None
  if not bits or any(b not in (1, 2, 3, 4, 8) for b in bits):
    raise argparse.ArgumentTypeError(
        f"--bits must be a comma-separated list of bit widths in 1, 2, 3, 4, 8, got {text!r}"
    )
  return bits


def _lam(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--lam must be a number in (0, 0.5], got {text!r}") from None
  if not 0 < value <= 0.5:
    raise argparse.ArgumentTypeError(f"--lam must be a number in (0, 0.5], got {value}")
  return value


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m talr_optax.demo",
      description="QAT with a cosine learning rate vs transition rate scheduling (TALR).",
  )
  p.add_argument("--quick", action="store_true",
                 help="smoke run: one seed, few epochs (under a minute on 2 CPU cores)")
  p.add_argument("--bits", type=_bits_list, default=None,
                 help="weight and activation bit widths to run, e.g. 2,1 (default: 2,1)")
  p.add_argument("--seeds", type=_positive_int("--seeds"), default=None,
                 help="number of seeds (default 3; 1 with --quick)")
  p.add_argument("--epochs", type=_positive_int("--epochs"), default=None,
                 help="QAT epochs per run (default 60 on digits, 400 on cifar10)")
  p.add_argument("--fp-epochs", type=_positive_int("--fp-epochs"), default=None,
                 help="full-precision pretraining epochs (default 15 on digits)")
  p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None,
                 help="batch size (default 32 on digits, 256 on cifar10)")
  p.add_argument("--rule", choices=("multiplicative", "additive"), default="multiplicative",
                 help="TALR rule (default: multiplicative, the better-tracking one here)")
  p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                 help="sgd: SGD vs SGDT (lr 0.1); adam: Adam vs AdamT (lr 1e-3)")
  p.add_argument("--lam", type=_lam, default=5e-3,
                 help="target scale lambda: R_0 = lambda * sqrt(bits) (default 5e-3)")
  p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits",
                 help="digits ships with scikit-learn; cifar10 needs --data-dir")
  p.add_argument("--model", choices=("cnn", "resnet20"), default=None,
                 help="cnn (8x8 digits) or resnet20 (CIFAR); default: the dataset's")
  p.add_argument("--data-dir", default=None,
                 help="CIFAR-10 python-pickle directory (data_batch_1..5, test_batch)")
  p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
  p.add_argument("--checkpoint-dir", default=None,
                 help="save each finished run here and skip runs already saved (resume)")
  return p


def config_from_args(argv: Sequence[str] | None = None) -> DemoConfig:
  """Parses the command line into a :class:`DemoConfig` (argparse errors exit 2)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  cifar = args.dataset == "cifar10"
  if cifar and not args.data_dir:
    parser.error("--dataset cifar10 needs --data-dir DIR (the CIFAR-10 python-pickle files)")
  model = args.model or ("resnet20" if cifar else "cnn")
  if model == "cnn" and cifar:
    parser.error("--model cnn is for 8x8 digits; use --model resnet20 with cifar10")
  if model == "resnet20" and not cifar:
    parser.error("--model resnet20 is for cifar10 (32x32 RGB); use --model cnn with digits")
  quick = args.quick
  return DemoConfig(
      dataset=args.dataset,
      model=model,
      bits=args.bits or (2, 1),
      seeds=args.seeds or (1 if quick else 3),
      epochs=args.epochs or (6 if quick else (400 if cifar else 60)),
      fp_epochs=args.fp_epochs or (4 if quick else (200 if cifar else 15)),
      batch_size=args.batch_size or (256 if cifar else 32),
      optimizer=args.optimizer,
      rule=args.rule,
      lam=args.lam,
      data_dir=args.data_dir,
      out=args.out,
      checkpoint_dir=args.checkpoint_dir,
  )


# ----------------------------------------------------------------------------
# Models and optimizers.


def _nnx():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import talr_optax.nnx as tnnx  # pylint: disable=import-outside-toplevel
  return nnx, tnnx


def make_model(cfg: DemoConfig, bits: int | None, seed: int, num_classes: int):
  nnx, tnnx = _nnx()
  rngs = nnx.Rngs(seed)
  if cfg.model == "cnn":
    return tnnx.SmallCNN(weight_bits=bits, act_bits=bits, num_classes=num_classes, rngs=rngs)
  return tnnx.ResNet20(weight_bits=bits, act_bits=bits, num_classes=num_classes, rngs=rngs)


def _base(cfg: DemoConfig, momentum: float):
  """The base optimizer of a group, without its learning-rate stage."""
  if cfg.optimizer == "adam":
    return optax.scale_by_adam()
  return optax.trace(momentum) if momentum else optax.identity()


def make_optimizer(cfg: DemoConfig, model, method: str, bits: int, total_steps: int):
  """``optax.partition`` over the four parameter groups of the reference setup."""
  _, tnnx = _nnx()
  lr = _BASE_LR[cfg.optimizer]
  lr_schedule = optax.cosine_decay_schedule(lr, total_steps)
  levels_fn = tnnx.levels_fn_for(model)
  decay = optax.add_decayed_weights(_WEIGHT_DECAY)
  if method == "talr":
    target = talr.cosine_target(talr.initial_target(bits, cfg.lam), total_steps)
    opt = talr.sgdt if cfg.optimizer == "sgd" else talr.adamt
    kwargs = dict(momentum=0.9) if cfg.optimizer == "sgd" else {}
    quantized = opt(lr_schedule, target, levels_fn, weight_decay=_WEIGHT_DECAY,
                    rule=cfg.rule, **kwargs)
  else:
    quantized = optax.chain(talr.track_transitions(levels_fn), decay, _base(cfg, 0.9),
                            optax.scale_by_learning_rate(lr_schedule))
  groups = {
      tnnx.QUANTIZED: quantized,
      tnnx.FULL_PRECISION: optax.chain(decay, _base(cfg, 0.9),
                                       optax.scale_by_learning_rate(lr_schedule)),
      tnnx.ACTIVATION_SCALE: optax.sgd(optax.cosine_decay_schedule(_ACT_SCALE_LR, total_steps)),
      tnnx.BATCH_NORM: optax.chain(_base(cfg, 0.0), optax.scale_by_learning_rate(lr_schedule)),
  }
  return optax.partition(groups, tnnx.param_labels(model)), lr_schedule


# ----------------------------------------------------------------------------
# Training.


def _step_metrics(opt_state) -> dict[str, jax.Array]:
  """Mean over quantized tensors of k, K, R and U (U only under TALR)."""
  m = talr.metrics(opt_state)
  out = {}
  for name, key in (("k", "transition_rate/"), ("K", "ema_transition_rate/"),
                    ("R", "target_transition_rate/"), ("U", "talr/")):
    values = [v for k, v in m.items() if k.startswith(key)]
    if values:
      out[name] = jnp.mean(jnp.stack(values))
  return out


def _make_steps():
  """Jitted ``train_step(model, optimizer, x, y) -> (loss, rates)`` and ``correct``."""
  nnx, _ = _nnx()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, _step_metrics(optimizer.opt_state)

  @nnx.jit
  def correct(model, x, y):
    return jnp.sum(jnp.argmax(model(x), -1) == y)

  return train_step, correct


def evaluate(model, correct_fn, split: data_lib.Split, batch_size: int = 500) -> float:
  model.eval()
  hits = 0
  for x, y in data_lib.batches(split, batch_size, drop_last=False):
    hits += int(correct_fn(model, jnp.asarray(x), jnp.asarray(y)))
  model.train()
  return hits / len(split.labels)


def _augment(cfg: DemoConfig):
  if cfg.dataset == "cifar10":
    return partial(data_lib.random_shift, max_shift=4, flip=True)
  return partial(data_lib.random_shift, max_shift=1)


def _steps_per_epoch(cfg: DemoConfig, dataset: data_lib.Dataset) -> int:
  return len(dataset.train.labels) // cfg.batch_size


def pretrain_full_precision(cfg: DemoConfig, dataset, seed: int, progress=None):
  """Trains the full-precision model that QAT of this seed starts from."""
  nnx, _ = _nnx()
  model = make_model(cfg, None, seed, dataset.num_classes)
  total = cfg.fp_epochs * _steps_per_epoch(cfg, dataset)
  lr = optax.cosine_decay_schedule(_BASE_LR[cfg.optimizer], total)
  tx = optax.chain(optax.add_decayed_weights(_WEIGHT_DECAY),
                   optax.sgd(lr, momentum=0.9) if cfg.optimizer == "sgd" else optax.adam(lr))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step, _ = _make_steps()

  rng = np.random.default_rng(10_000 + seed)
  model.train()
  for _ in range(cfg.fp_epochs):
    for x, y in data_lib.batches(dataset.train, cfg.batch_size, rng=rng, augment=_augment(cfg)):
      step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
    if progress is not None:
      progress()
  return model


def _md2tp(model) -> np.ndarray:
  """Distance of every quantized weight to its nearest transition point."""
  _, tnnx = _nnx()
  parts = []
  for _, layer in tnnx.quantized_layers(model):
    if layer.weight_bits is None:
      continue
    d = talr.distance_to_transition(layer.kernel[...], layer.weight_scale[...],
                                    layer.weight_bits)
    # Binary distances live in [0, 1]; halve them to share the [0, 0.5] axis.
    parts.append(np.asarray(d).ravel() * (0.5 if layer.weight_bits == 1 else 1.0))
  return np.concatenate(parts)


def _tracking_error(trace: dict[str, list[float]], r0: float) -> float:
  """Mean |K - R| / R_0 after the warm-up."""
  K, R = np.asarray(trace["K"]), np.asarray(trace["R"])
  start = int(_WARMUP_FRACTION * len(K))
  return float(np.mean(np.abs(K[start:] - R[start:])) / r0)


def _snapshot(model, optimizer) -> dict[str, Any]:
  nnx, _ = _nnx()
  return {"model": nnx.to_pure_dict(nnx.state(model)),
          "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}


def _restore(model, optimizer, saved: dict[str, Any]) -> None:
  nnx, _ = _nnx()
  for obj, key in ((model, "model"), (optimizer, "optimizer")):
    state = nnx.state(obj)
    nnx.replace_by_pure_dict(state, saved[key])
    nnx.update(obj, state)


class _Interrupted(RuntimeError):
  """Raised by the ``stop_after_epoch`` test hook of :func:`run_qat`."""


def run_qat(cfg: DemoConfig, dataset, fp_model, bits: int, seed: int, method: str,
            progress=None, checkpointer=None, stop_after_epoch: int | None = None
            ) -> dict[str, Any]:
  """One QAT run from ``fp_model``; returns its record for ``results.json``.

  With a ``checkpointer`` (:class:`talr_optax.checkpoint.Checkpointer`) the
  model, optimizer state, traces and data order are saved after every epoch,
  and a run that has checkpoints resumes from the latest one, bit for bit.
  ``stop_after_epoch`` interrupts the run (tests of resuming).
  """
  nnx, tnnx = _nnx()
  model = make_model(cfg, bits, seed, dataset.num_classes)
  tnnx.load_full_precision(model, fp_model)
  rng = np.random.default_rng(seed)
  first_x, _ = next(data_lib.batches(dataset.train, cfg.batch_size, rng=np.random.default_rng(seed)))
  tnnx.calibrate(model, jnp.asarray(first_x))
  steps_per_epoch = _steps_per_epoch(cfg, dataset)
  total = cfg.epochs * steps_per_epoch
  tx, lr_schedule = make_optimizer(cfg, model, method, bits, total)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train_step, correct = _make_steps()
  r0 = talr.initial_target(bits, cfg.lam)
  target = talr.cosine_target(r0, total)

  model.train()
  traces: dict[str, list[float]] = {"k": [], "K": [], "R": [], "U": [], "lr": [], "loss": []}
  accs, md2tp_means = [], []
  step = start_epoch = 0
  if checkpointer is not None and checkpointer.latest_step() is not None:
    start_epoch, saved, meta = checkpointer.restore(_snapshot(model, optimizer))
    _restore(model, optimizer, saved)
    traces, accs, md2tp_means = meta["traces"], meta["accs"], meta["md2tp_means"]
    step = len(traces["k"])
    rng.bit_generator.state = meta["rng"]
    if progress is not None:
      progress(epoch=start_epoch, loss=float("nan"), acc=accs[-1], U=traces["U"][-1],
               K=traces["K"][-1], advance=start_epoch)
  for epoch in range(start_epoch, cfg.epochs):
    if stop_after_epoch is not None and epoch >= stop_after_epoch:
      raise _Interrupted(f"stopped after epoch {epoch}")
    pending = []
    for x, y in data_lib.batches(dataset.train, cfg.batch_size, rng=rng, augment=_augment(cfg)):
      pending.append(train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y)))
    for loss, m in jax.device_get(pending):
      traces["loss"].append(float(loss))
      traces["k"].append(float(m["k"]))
      traces["K"].append(float(m["K"]))
      # The baseline has no target of its own: log the one TALR follows.
      traces["R"].append(float(m["R"]) if "R" in m else float(target(step)))
      traces["lr"].append(float(lr_schedule(step)))
      traces["U"].append(float(m["U"]) if "U" in m else traces["lr"][-1])
      step += 1
    accs.append(evaluate(model, correct, dataset.test))
    md2tp_means.append(float(np.mean(_md2tp(model))))
    if checkpointer is not None:
      checkpointer.save(epoch + 1, _snapshot(model, optimizer), meta={
          "traces": traces, "accs": accs, "md2tp_means": md2tp_means,
          "rng": rng.bit_generator.state})
    if progress is not None:
      progress(epoch=epoch + 1, loss=float(np.mean(traces["loss"][-steps_per_epoch:])),
               acc=accs[-1], U=traces["U"][-1], K=traces["K"][-1])
  d = _md2tp(model)
  counts, edges = np.histogram(d, bins=_HIST_BINS, range=(0.0, 0.5), density=True)
  return {
      "bits": bits,
      "seed": seed,
      "method": method,
      "final_test_accuracy": accs[-1],
      "test_accuracy_per_epoch": accs,
      "tracking_error": _tracking_error(traces, r0),
      "r0": r0,
      "md2tp_mean_per_epoch": md2tp_means,
      "md2tp_histogram": {"edges": edges.tolist(), "density": counts.tolist(),
                          "mean": float(np.mean(d))},
      "trace": traces,
  }


# ----------------------------------------------------------------------------
# Checkpoints of a whole demo: one directory per run, the finished record, and
# the full-precision model of each seed (QAT of a later run starts from it).


class RunStore:
  """Checkpoints of every run of one demo configuration under ``root``.

  ``root/config.json`` records the configuration; resuming with another one is
  an error rather than a silent mix of runs. Finished runs keep their record
  (``record.json``); unfinished ones resume from their latest epoch.
  """

  # Fields that do not change what a run computes.
  _FREE = ("out", "checkpoint_dir", "seeds")

  def __init__(self, root: str | os.PathLike[str], cfg: DemoConfig):
    self.root = Path(root)
    if self.root.exists() and not self.root.is_dir():
      raise ValueError(f"--checkpoint-dir {self.root} exists and is not a directory")
    self.root.mkdir(parents=True, exist_ok=True)
    fixed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in self._FREE}
    fixed["bits"] = list(fixed["bits"])
    config_path = self.root / "config.json"
    if config_path.exists():
      stored = json.loads(config_path.read_text())
      diff = sorted(k for k in set(stored) | set(fixed) if stored.get(k) != fixed.get(k))
      # Runs of other bit widths can share the directory.
      diff = [k for k in diff if k != "bits"]
      if diff:
        raise ValueError(
            f"--checkpoint-dir {self.root} holds runs of another configuration "
            f"(differs in {', '.join(diff)}); use another directory or the same settings"
        )
    else:
      _write_json_atomic(config_path, fixed)

  def _dir(self, bits: int, seed: int, method: str) -> Path:
    return self.root / f"seed{seed}_w{bits}_{method}"

  def finished(self, bits: int, seed: int, method: str) -> dict[str, Any] | None:
    path = self._dir(bits, seed, method) / "record.json"
    return json.loads(path.read_text()) if path.exists() else None

  def save_finished(self, bits: int, seed: int, method: str, record: dict[str, Any]) -> None:
    _write_json_atomic(self._dir(bits, seed, method) / "record.json", record)

  def checkpointer(self, bits: int, seed: int, method: str):
    from talr_optax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
    return Checkpointer(self._dir(bits, seed, method) / "epochs", max_to_keep=2)

  def full_precision(self, cfg: DemoConfig, dataset, seed: int, progress=None):
    """The seed's pretrained full-precision model, trained once and cached."""
    from talr_optax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
    nnx, _ = _nnx()
    with Checkpointer(self.root / f"seed{seed}_full_precision") as ckpt:
      if ckpt.latest_step() is not None:
        model = make_model(cfg, None, seed, dataset.num_classes)
        _, saved, _ = ckpt.restore(nnx.to_pure_dict(nnx.state(model)))
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, saved)
        nnx.update(model, state)
        if progress is not None:
          for _ in range(cfg.fp_epochs):
            progress()
        return model
      model = pretrain_full_precision(cfg, dataset, seed, progress)
      ckpt.save(cfg.fp_epochs, nnx.to_pure_dict(nnx.state(model)))
      return model


# ----------------------------------------------------------------------------
# Summary, output and the command line.


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean ± std of final accuracy and tracking error per (bits, method)."""
  rows = []
  for bits in sorted({r["bits"] for r in runs}, reverse=True):
    for method in ("sgd", "talr"):
      sel = [r for r in runs if r["bits"] == bits and r["method"] == method]
      if not sel:
        continue
      acc = 100 * np.array([r["final_test_accuracy"] for r in sel])
      err = np.array([r["tracking_error"] for r in sel])
      md = np.array([r["md2tp_histogram"]["mean"] for r in sel])
      rows.append({
          "bits": bits, "method": method, "seeds": len(sel),
          "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
          "tracking_error_mean": float(err.mean()),
          "md2tp_mean": float(md.mean()),
      })
  return rows


def _print_table(cfg: DemoConfig, rows: list[dict[str, Any]], labels: dict[str, str]) -> None:
  from rich.console import Console  # pylint: disable=import-outside-toplevel
  from rich.table import Table  # pylint: disable=import-outside-toplevel

  table = Table(title=f"QAT on {cfg.dataset} ({cfg.model}), {cfg.epochs} epochs, "
                      f"test accuracy over seeds")
  for col in ("bits (W/A)", "optimizer", "seeds", "test acc. (%)", "mean |K-R|/R0", "mean md2tp"):
    table.add_column(col, justify="right")
  for r in rows:
    table.add_row(f"{r['bits']}/{r['bits']}", labels[r["method"]], str(r["seeds"]),
                  f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}",
                  f"{r['tracking_error_mean']:.3f}", f"{r['md2tp_mean']:.3f}")
  Console().print(table)


def _write_json_atomic(path: Path, obj: Any) -> None:
  """Writes via a temporary file: a failed run never leaves a half-written file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _load_dataset(cfg: DemoConfig) -> data_lib.Dataset:
  if cfg.dataset == "digits":
    return data_lib.load_digits(seed=0)
  return data_lib.load_cifar10(cfg.data_dir)


def run(cfg: DemoConfig, *, stop_after_epoch: int | None = None) -> dict[str, Any]:
  """Runs the whole demo; writes ``results.json`` and the figures to ``cfg.out``.

  ``stop_after_epoch`` interrupts every QAT run after that many epochs (a test
  hook for resuming from ``cfg.checkpoint_dir``).
  """
  from rich.progress import (  # pylint: disable=import-outside-toplevel
      BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn)
  from talr_optax import plots  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  out = Path(cfg.out)
  dataset = _load_dataset(cfg)
  labels = METHOD_LABELS if cfg.optimizer == "sgd" else ADAM_LABELS
  store = RunStore(cfg.checkpoint_dir, cfg) if cfg.checkpoint_dir else None
  runs: list[dict[str, Any]] = []
  n_runs = cfg.seeds * len(cfg.bits) * 2
  total_epochs = cfg.seeds * cfg.fp_epochs + n_runs * cfg.epochs
  columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
  with Progress(*columns, transient=False) as bar:
    task = bar.add_task("epochs", total=total_epochs, status="")
    for seed in range(cfg.seeds):
      todo = []
      for bits in cfg.bits:
        for method in ("sgd", "talr"):
          record = store.finished(bits, seed, method) if store else None
          if record is None:
            todo.append((bits, method))
          else:
            runs.append(record)
            bar.advance(task, cfg.epochs)
      if not todo:
        bar.advance(task, cfg.fp_epochs)
        continue
      bar.update(task, description=f"seed {seed}: full-precision pretraining")
      advance_fp = lambda: bar.advance(task)
      fp_model = (store.full_precision(cfg, dataset, seed, advance_fp) if store
                  else pretrain_full_precision(cfg, dataset, seed, advance_fp))
      for bits, method in todo:
        name = f"seed {seed} W{bits}A{bits} {labels[method]:>5}"
        bar.update(task, description=name)

        def report(epoch, loss, acc, U, K, advance=1):
          bar.update(task, advance=advance, status=(
              f"epoch {epoch}/{cfg.epochs} loss {loss:.3f} acc {100 * acc:.1f}% "
              f"U {U:.3g} K {K:.2e}"))

        ckpt = store.checkpointer(bits, seed, method) if store else None
        try:
          record = run_qat(cfg, dataset, fp_model, bits, seed, method, progress=report,
                           checkpointer=ckpt, stop_after_epoch=stop_after_epoch)
        finally:
          if ckpt is not None:
            ckpt.close()
        if store is not None:
          store.save_finished(bits, seed, method, record)
        runs.append(record)
  rows = summarize(runs)
  results = {
      "config": {**dataclasses.asdict(cfg), "method_labels": labels},
      "summary": rows,
      "runs": runs,
      "seconds": time.perf_counter() - start,
      "versions": {"jax": jax.__version__, "optax": optax.__version__,
                   "talr_optax": talr.__version__},
  }
  _write_json_atomic(out / "results.json", results)
  figures = plots.plot_all(results, out)
  _print_table(cfg, rows, labels)
  print(f"wrote {out / 'results.json'} and {len(figures)} figures to {out}/ "
        f"in {results['seconds']:.0f} s")
  return results


def main(argv: Sequence[str] | None = None) -> int:
  cfg = config_from_args(argv)
  try:
    run(cfg)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
