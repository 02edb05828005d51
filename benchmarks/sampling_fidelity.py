"""Sampled transition counting: how far the sampled K is from the exact one.

``sample_size=N`` counts a rate group's transitions on a fixed strided grid
of at most ``N`` weights (``talr_optax.counting.sample_strides``). This
script measures what that costs on a real QAT run of the demo
(``talr_optax.demo``; default: digits, SmallCNN, W2A2, SGDT, 60 epochs):

* **one trajectory, two counts**: TALR is driven by the sampled count
  (``sgdt(..., sample_size=N)``) and ``talr_optax.track_transitions(levels_fn,
  R_0)`` is appended as the last stage of the whole optimizer, so it counts
  every weight of the same updates. Reported: the mean over steps (after a
  10 % warm-up) and over the sampled tensors of ``|K_sampled - K_exact| / R_0``
  per seed, and its signed mean (a bias that does not average out);
* **what a random sample would give**: counting ``n`` of a tensor's ``M``
  weights drawn at random each step has a per-step standard error
  ``sqrt(k (1 - k) / n)`` (times ``sqrt((M - n) / (M - 1))``, drawn without
  replacement), and the EMA ``K_(t+1) = m K_t + (1 - m) k_t`` shrinks
  independent errors by about ``sqrt((1 - m) / (1 + m))`` (0.071 for m = 0.99).
  Reported: that standard error at ``k = R_0``, and the mean ``|error|`` the
  variance recursion ``v_(t+1) = m^2 v_t + (1 - m)^2 var(k_t)`` predicts along
  the measured exact ``k`` (times ``sqrt(2 / pi)``, a normal's mean
  ``|x| / sigma``). A fixed grid is not a fresh random sample: the same weights
  are counted every step, so if they cross more (or less) often than the rest
  of the tensor, the error is a bias that the EMA does not average out;
* **replayed**: the exact runs record which weights changed in every update;
  on those, the grid, a fixed random subset of the same size and a fresh
  random subset per step are counted offline (no feedback into the run), to
  tell the cost of a fixed subset from that of the grid's structure;
* **accuracy**: the final test accuracy of TALR driven by the sampled count
  against TALR with exact counting (``sample_size=None``), same seeds, same
  pretrained models and data order.

The tensors of the digits models are small (SmallCNN: 4,608 and 9,216
weights; MobileNetV2Tiny: 128 to 1,536 per tensor), so sampling applies
only at small ``N``; the table says which tensors are sampled at each ``N``
and how many of their weights are counted.

Another task plugs in through :data:`RUNNERS`: a function that runs one
seed at one sample size and returns a :class:`Trajectory`; the demo's tasks
(``talr_optax.demo.tasks.TASKS``) already fit :func:`demo_trajectory`.

Usage:
  python benchmarks/sampling_fidelity.py --quick     # 1 seed, 2 epochs, N = 256
  python benchmarks/sampling_fidelity.py             # 3 seeds, 60 epochs, N = 64, 256, 1024
  python benchmarks/sampling_fidelity.py --model mobilenet --sample-sizes 64,256
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _harness as H

import talr_optax as talr
from talr_optax import _tree
from talr_optax.counting import sample_strides, take_sample

# Steps left out at the start: K starts at R_0 and needs ~1/(1-m) steps.
WARMUP_FRACTION = 0.1
EMA_MOMENTUM = 0.99  # the demo's (and the paper's) m
SAMPLE_SIZES = (64, 256, 1024)
QUICK = dict(seeds=1, epochs=2, fp_epochs=1, sample_sizes=(256,))


@dataclasses.dataclass
class Trajectory:
  """One run: per step and rate group, the sampled and the exact count.

  Arrays are ``(steps, groups)``; ``counted`` equals ``weights`` for a group
  counted exactly. Entry ``t`` is the state after update ``t``.
  """

  names: list[str]
  shapes: list[tuple[int, ...]]  # of each group's levels
  counted: list[int]  # n: weights the sampled count reads (M when exact)
  r0: float
  k_sampled: np.ndarray
  K_sampled: np.ndarray
  k_exact: np.ndarray
  K_exact: np.ndarray
  final_accuracy: float
  # Per group, (steps, M) bool: which weights changed level in each update
  # (only when asked for, and only if the runner can record it).
  changes: Optional[list[np.ndarray]] = None

  @property
  def weights(self) -> list[int]:
    """M: weights per rate group."""
    return [math.prod(shape) for shape in self.shapes]


# (task, model, bits, seed, sample_size or None, epochs, fp_epochs, record_changes)
Runner = Callable[[str, str, int, int, Optional[int], int, int, bool], Trajectory]


# ---------------------------------------------------------------------------
# The demo's tasks.


def counted_weights(shape: Sequence[int], sample_size: Optional[int]) -> int:
  """Weights of a tensor of ``shape`` that ``sample_size`` counts (all if None)."""
  strides = None if sample_size is None else sample_strides(shape, sample_size)
  if strides is None:
    return math.prod(shape)
  return math.prod(-(-d // s) for d, s in zip(shape, strides))


def _pair(m: dict[str, jax.Array], field: str, names: Sequence[str]) -> jax.Array:
  """``(sampled, exact)`` rows of ``field``: TALR's state first, then the monitor's.

  ``talr.metrics`` gives the second state holding a key the suffix ``#1``.
  """
  exact = lambda n: m[f"{field}/{n}#1"]  # noqa: E731
  return jnp.stack([jnp.stack([m[f"{field}/{n}"] for n in names]),
                    jnp.stack([exact(n) for n in names])])


def _monitor_levels(opt_state: Any) -> dict[str, jax.Array]:
  """The exact monitor's stored levels (of the latest params), by rate name."""
  is_monitor = lambda x: isinstance(x, talr.TrackTransitionsState)  # noqa: E731
  (monitor,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_monitor) if is_monitor(x)]
  return {name: _tree.unbox(x) for name, x in _tree.leaves_with_paths(monitor.prev_levels)
          if _tree.unbox(x) is not None}


def demo_trajectory(task_name: str, model_name: str, bits: int, seed: int,
                    sample_size: Optional[int], epochs: int, fp_epochs: int,
                    record_changes: bool = False) -> Trajectory:
  """A TALR run of a demo task, its own count sampled, an exact monitor last.

  The run is the demo's TALR run (its optimizer groups, pretraining, first
  batch for calibration and data order), with
  ``track_transitions(levels_fn, R_0)`` chained after the whole optimizer.
  ``record_changes`` also keeps which weights changed level in each update.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  from talr_optax.demo import data, optim, train  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.config import DemoConfig  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.tasks import TASKS, make_model  # pylint: disable=import-outside-toplevel

  task = TASKS[task_name]
  cfg = DemoConfig(dataset=task_name, model=model_name, bits=(bits,), seeds=1, epochs=epochs,
                   fp_epochs=fp_epochs, batch_size=task.defaults.batch_size,
                   sample_size=sample_size)
  dataset = _load(task_name)
  fp_model = _pretrained(task_name, model_name, seed, fp_epochs)
  model = make_model(cfg, bits, seed, dataset.num_classes)
  tnnx.load_full_precision(model, fp_model)
  first_x, _ = next(data.batches(dataset.train, cfg.batch_size,
                                 rng=np.random.default_rng(seed)))
  tnnx.calibrate(model, jnp.asarray(first_x))
  total = epochs * train.steps_per_epoch(cfg, dataset)
  r0, _ = optim.target(cfg, bits, total)
  levels_fn = tnnx.levels_fn_for(model)
  # The monitor is the last stage: it counts, on every weight, the
  # transitions of exactly the updates TALR's sampled count saw.
  tx = optax.chain(optim.qat(cfg, model, "talr", bits, total),
                   talr.track_transitions(levels_fn, r0, momentum=EMA_MOMENTUM))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  names = sorted(k.split("/", 1)[1] for k in talr.metrics(optimizer.opt_state)
                 if k.startswith("transition_rate/") and "#" not in k)
  shapes = _level_shapes(levels_fn, nnx.state(model, nnx.Param))

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_grads = nnx.value_and_grad(lambda m: task.loss(m(x), y))
    _, grads = loss_grads(model)
    optimizer.update(model, grads)
    m = talr.metrics(optimizer.opt_state)
    levels = _monitor_levels(optimizer.opt_state) if record_changes else {}
    return (_pair(m, "transition_rate", names), _pair(m, "ema_transition_rate", names),
            [levels[n].reshape(-1) for n in names if levels])

  rng = np.random.default_rng(seed)
  k, K = [], []
  prev = [np.asarray(x).reshape(-1) for x in
          map(_monitor_levels(optimizer.opt_state).get, names)] if record_changes else []
  changes: list[list[np.ndarray]] = [[] for _ in prev]
  model.train()
  for _ in range(epochs):
    pending = [step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
               for x, y in data.batches(dataset.train, cfg.batch_size, rng=rng,
                                        augment=task.augment)]
    for k_t, K_t, levels in jax.device_get(pending):  # one transfer per epoch
      k.append(k_t)
      K.append(K_t)
      for g, new in enumerate(levels):
        changes[g].append(new != prev[g])
        prev[g] = new
  k, K = np.asarray(k), np.asarray(K)
  return Trajectory(
      names=names, shapes=[shapes[n] for n in names],
      counted=[counted_weights(shapes[n], sample_size) for n in names], r0=float(r0),
      k_sampled=k[:, 0], K_sampled=K[:, 0], k_exact=k[:, 1], K_exact=K[:, 1],
      final_accuracy=train.evaluate(task, model, dataset.test),
      changes=[np.stack(c) for c in changes] if record_changes else None)


def _level_shapes(levels_fn: Callable[[Any], Any], params: Any) -> dict[str, tuple[int, ...]]:
  """Shape of each quantized leaf's levels, by the name its rate has."""
  shapes = jax.eval_shape(levels_fn, params)
  return {name: tuple(x.shape) for name, x in _tree.leaves_with_paths(shapes, is_leaf_fn=None)}


# The data and each seed's pretrained model are shared by every sample size.
# (A task that needs --data-dir would pass it here.)
@functools.lru_cache(maxsize=None)
def _load(task_name: str) -> Any:
  from talr_optax.demo.config import DemoConfig  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.tasks import TASKS  # pylint: disable=import-outside-toplevel
  return TASKS[task_name].load(DemoConfig(dataset=task_name))


@functools.lru_cache(maxsize=None)
def _pretrained(task_name: str, model_name: str, seed: int, fp_epochs: int) -> Any:
  from talr_optax.demo import train  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.config import DemoConfig  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.tasks import TASKS  # pylint: disable=import-outside-toplevel
  task = TASKS[task_name]
  cfg = DemoConfig(dataset=task_name, model=model_name, fp_epochs=fp_epochs,
                   batch_size=task.defaults.batch_size)
  return train.pretrain_full_precision(cfg, task, _load(task_name), seed)


# Task name -> runner. A task whose model the demo does not build (or that
# needs layer_axes for its monitor) adds its own runner here.
RUNNERS: dict[str, Runner] = {"digits": demo_trajectory}


# ---------------------------------------------------------------------------
# The measurement.


def expected_error(traj: Trajectory, group: int, momentum: float = EMA_MOMENTUM
                   ) -> tuple[float, float]:
  """What a fresh random sample of ``n`` weights per step would give, over ``R_0``.

  Returns:
    ``(se_at_r0, mean_abs)``: the standard error of ``K`` at ``k = R_0``,
    ``sqrt(R_0 (1 - R_0) / n * fpc) * sqrt((1 - m) / (1 + m))``, and the mean
    ``|K_sampled - K_exact|`` after the warm-up that the variance recursion
    predicts along the measured exact ``k``, both divided by ``R_0``.
  """
  n, M = traj.counted[group], traj.weights[group]
  if n >= M:
    return 0.0, 0.0
  fpc = (M - n) / (M - 1)  # drawn without replacement
  r0 = traj.r0
  se_at_r0 = math.sqrt(r0 * (1 - r0) / n * fpc * (1 - momentum) / (1 + momentum)) / r0
  k = traj.k_exact[:, group].astype(np.float64)
  var, sd = 0.0, np.empty_like(k)
  for t, k_t in enumerate(k):
    var = momentum**2 * var + (1 - momentum)**2 * k_t * (1 - k_t) / n * fpc
    sd[t] = math.sqrt(var)
  start = int(WARMUP_FRACTION * len(k))
  return se_at_r0, float(math.sqrt(2 / math.pi) * np.mean(sd[start:]) / r0)


def _ema(k: np.ndarray, start: float, momentum: float = EMA_MOMENTUM) -> np.ndarray:
  """``K`` after each step, ``K_(t+1) = m K_t + (1 - m) k_t`` along the last axis."""
  K, out = np.full(k.shape[:-1], start, np.float64), np.empty(k.shape, np.float64)
  for t in range(k.shape[-1]):
    K = momentum * K + (1 - momentum) * k[..., t]
    out[..., t] = K
  return out


def subset_errors(traj: Trajectory, sample_sizes: Sequence[int], draws: int = 20,
                  seed: int = 0) -> dict[int, dict[str, float]]:
  """Mean ``|K_subset - K_exact| / R_0`` of three ways to count ``n`` of ``M`` weights.

  On one recorded trajectory (no feedback of the count into the run): the
  core's fixed strided grid (``grid``), a fixed random subset of the same
  size drawn once (``fixed_random``, mean over ``draws`` subsets), and a
  fresh random subset every step (``fresh_random``, the case the standard
  error formula describes). Averaged over the groups sampled at each ``n``.
  """
  rng = np.random.default_rng(seed)
  start = int(WARMUP_FRACTION * len(traj.K_exact))
  out = {}
  for n_max in sample_sizes:
    errs: dict[str, list[float]] = {"grid": [], "fixed_random": [], "fresh_random": []}
    for g, shape in enumerate(traj.shapes):
      strides = sample_strides(shape, n_max)
      if strides is None:
        continue
      changed = traj.changes[g]
      M = changed.shape[1]
      K_exact = _ema(changed.mean(1), traj.r0)
      # The recorded changes reproduce the monitor's K (float32 there).
      np.testing.assert_allclose(K_exact, traj.K_exact[:, g], rtol=1e-4, atol=1e-7)
      grid = take_sample(np.arange(M).reshape(shape), strides).ravel()
      n = grid.size
      fixed = np.stack([changed[:, rng.choice(M, n, replace=False)].mean(1)
                        for _ in range(draws)])
      c = changed.sum(1)
      fresh = rng.hypergeometric(c, M - c, n, size=(draws, len(c))) / n

      def err(k: np.ndarray) -> float:
        return float(np.mean(np.abs(_ema(k, traj.r0) - K_exact)[..., start:]) / traj.r0)

      errs["grid"].append(err(changed[:, grid].mean(1)))
      errs["fixed_random"].append(err(fixed))
      errs["fresh_random"].append(err(fresh))
    if errs["grid"]:
      out[n_max] = {kind: float(np.mean(v)) for kind, v in errs.items()}
  return out


def compare(traj: Trajectory) -> dict[str, Any]:
  """Sampled against exact ``K`` after the warm-up, per rate group and pooled."""
  start = int(WARMUP_FRACTION * len(traj.K_exact))
  diff = (traj.K_sampled - traj.K_exact)[start:] / traj.r0
  groups = []
  for g, name in enumerate(traj.names):
    se, expected = expected_error(traj, g)
    groups.append({
        "name": name, "weights": traj.weights[g], "counted": traj.counted[g],
        "sampled": traj.counted[g] < traj.weights[g],
        "mean_abs_error": float(np.mean(np.abs(diff[:, g]))),
        "mean_signed_error": float(np.mean(diff[:, g])),
        "expected_se_at_r0": se, "expected_mean_abs_error": expected,
        "mean_k_exact": float(np.mean(traj.k_exact[start:, g])),
    })
  sampled = [g for g in groups if g["sampled"]]

  def mean(key: str, sel: list[dict[str, Any]]) -> float:
    return float(np.mean([g[key] for g in sel])) if sel else 0.0

  return {
      "groups": groups,
      "sampled_groups": [g["name"] for g in sampled],
      # Over the sampled groups (the others match exactly, by construction).
      "mean_abs_error": mean("mean_abs_error", sampled),
      "mean_signed_error": mean("mean_signed_error", sampled),
      "expected_se_at_r0": mean("expected_se_at_r0", sampled),
      "expected_mean_abs_error": mean("expected_mean_abs_error", sampled),
      "mean_abs_error_all_groups": mean("mean_abs_error", groups),
      "final_accuracy": traj.final_accuracy,
      "steps": len(traj.K_exact),
  }


def measure(task: str, *, model: str, bits: int = 2, seeds: int = 3,
            sample_sizes: Sequence[int] = SAMPLE_SIZES, epochs: int = 60, fp_epochs: int = 15
            ) -> list[dict[str, Any]]:
  """One row per (sample size or exact, seed) of ``task`` (a key of :data:`RUNNERS`).

  The exact run of each seed also records which weights changed, and its row
  holds :func:`subset_errors` at every sample size (if the runner records them).
  """
  if task not in RUNNERS:
    raise SystemExit(f"--task must be one of {', '.join(RUNNERS)}, got {task!r}")
  rows = []
  for seed in range(seeds):
    for n in (None, *sample_sizes):
      t0 = time.perf_counter()
      traj = RUNNERS[task](task, model, bits, seed, n, epochs, fp_epochs, n is None)
      row = {"task": task, "model": model, "bits": bits, "seed": seed, "sample_size": n,
             "r0": traj.r0, **compare(traj), "seconds": time.perf_counter() - t0,
             "load": H.loadavg()}
      if traj.changes is not None:
        row["subset_errors"] = subset_errors(traj, sample_sizes)
      if n is None and row["mean_abs_error_all_groups"] > 1e-6:
        # Both count every weight of the same updates: they must agree.
        raise RuntimeError(f"exact TALR and the exact monitor disagree: {row}")
      rows.append(row)
      print(f"seed {seed} N={n}: |K_s-K_e|/R0 {row['mean_abs_error']:.4f}, "
            f"acc {100 * row['final_accuracy']:.2f}%, {row['seconds']:.0f} s", flush=True)
  return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per sample size: errors per seed and mean, expected error, accuracy vs exact."""
  exact = [r for r in rows if r["sample_size"] is None]
  out = []
  for n in sorted({r["sample_size"] for r in rows if r["sample_size"] is not None}):
    sel = sorted((r for r in rows if r["sample_size"] == n), key=lambda r: r["seed"])
    groups = sel[0]["groups"]
    out.append({
        "sample_size": n,
        "sampled_tensors": [f"{g['name']} ({g['counted']}/{g['weights']})"
                            for g in groups if g["sampled"]],
        "mean_abs_error_per_seed": [r["mean_abs_error"] for r in sel],
        "mean_abs_error": float(np.mean([r["mean_abs_error"] for r in sel])),
        "mean_signed_error": float(np.mean([r["mean_signed_error"] for r in sel])),
        "expected_se_at_r0": sel[0]["expected_se_at_r0"],
        "expected_mean_abs_error": float(np.mean([r["expected_mean_abs_error"] for r in sel])),
        "accuracy_sampled": [100 * r["final_accuracy"] for r in sel],
        "accuracy_exact": [100 * r["final_accuracy"] for r in exact],
        # The same counts replayed on the exact runs' recorded transitions.
        "replayed_on_exact_runs": {
            kind: float(np.mean([r["subset_errors"][n][kind] for r in exact]))
            for kind in ("grid", "fixed_random", "fresh_random")
        } if all(n in r.get("subset_errors", {}) for r in exact) and exact else None,
    })
  return out


def _tensors_cell(sampled: Sequence[str], groups: int) -> str:
  """The sampled tensors by name if few (the JSON always lists them), else a count."""
  if len(sampled) <= 3:
    return ", ".join(sampled) or "none"
  return f"{len(sampled)} of {groups} tensors"


def _mean_std(xs: Sequence[float]) -> str:
  return f"{np.mean(xs):.2f} ± {np.std(xs):.2f}" if xs else "-"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true",
                  help=f"smoke run: {QUICK['seeds']} seed, {QUICK['epochs']} epochs, N = 256")
  ap.add_argument("--task", default="digits", choices=tuple(RUNNERS))
  ap.add_argument("--model", default="cnn", help="a model of the task (digits: cnn, mobilenet)")
  ap.add_argument("--bits", type=int, default=2)
  ap.add_argument("--seeds", type=int, default=None, help="default 3")
  ap.add_argument("--epochs", type=int, default=None, help="QAT epochs (default 60)")
  ap.add_argument("--fp-epochs", type=int, default=None, help="pretraining epochs (default 15)")
  ap.add_argument("--sample-sizes", default=None,
                  help="comma list of N (default " + ",".join(map(str, SAMPLE_SIZES)) + ")")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  quick = QUICK if args.quick else dict(seeds=3, epochs=60, fp_epochs=15,
                                        sample_sizes=SAMPLE_SIZES)
  sizes = (tuple(int(x) for x in args.sample_sizes.split(","))
           if args.sample_sizes else quick["sample_sizes"])
  if any(n < 1 for n in sizes):
    raise SystemExit(f"--sample-sizes must be integers >= 1, got {args.sample_sizes!r}")
  from talr_optax.demo.tasks import TASKS  # pylint: disable=import-outside-toplevel
  if args.task in TASKS and args.model not in TASKS[args.task].models:
    raise SystemExit(f"--model must be one of {', '.join(TASKS[args.task].models)} with "
                     f"--task {args.task}, got {args.model!r}")
  t0, load = time.perf_counter(), H.loadavg()
  rows = measure(args.task, model=args.model, bits=args.bits,
                 seeds=args.seeds or quick["seeds"], sample_sizes=sizes,
                 epochs=args.epochs or quick["epochs"],
                 fp_epochs=args.fp_epochs or quick["fp_epochs"])
  table = summarize(rows)
  H.print_table(
      f"sampled vs exact K, {args.task} {args.model} W{args.bits}A{args.bits} "
      f"(errors / R_0, after a {WARMUP_FRACTION:.0%} warm-up)",
      ["N", "sampled tensors (counted/weights)", "|Ks-Ke| per seed", "mean", "signed",
       "random-sample SE", "random-sample E|err|", "acc sampled", "acc exact"],
      [[r["sample_size"], _tensors_cell(r["sampled_tensors"], len(rows[0]["groups"])),
        " ".join(f"{e:.3f}" for e in r["mean_abs_error_per_seed"]), r["mean_abs_error"],
        r["mean_signed_error"], r["expected_se_at_r0"], r["expected_mean_abs_error"],
        _mean_std(r["accuracy_sampled"]), _mean_std(r["accuracy_exact"])] for r in table])
  out = H.results_path(f"sampling_fidelity_{args.task}_{args.model}", args.quick, args.out)
  result = dict(meta=H.meta(sys.argv[1:] if argv is None else argv,
                            seconds=time.perf_counter() - t0, load_before=load,
                            load_after=H.loadavg(), warmup_fraction=WARMUP_FRACTION,
                            ema_momentum=EMA_MOMENTUM),
                summary=table, rows=rows)
  replayed = [r for r in table if r["replayed_on_exact_runs"]]
  if replayed:
    H.print_table(
        "the same counts replayed on the exact runs: mean |K_subset - K_exact| / R_0",
        ["N", "strided grid", "fixed random subset", "fresh random subset per step"],
        [[r["sample_size"], *r["replayed_on_exact_runs"].values()] for r in replayed])
  H.write_json(out, result)
  return result


if __name__ == "__main__":
  main()
