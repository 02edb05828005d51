"""Batch-norm re-estimation after QAT: MobileNetV2Tiny W2A2 on digits, SGD and SGDT.

Nagel et al. (ICML 2022) find that a depthwise net's batch-norm running
statistics, averaged over steps in which oscillating weights kept changing,
describe none of the final quantized weights, and that re-estimating them
with the final weights recovers accuracy. This benchmark trains the demo's
``--model mobilenet`` runs (``python -m talr_optax.demo --model mobilenet``:
the same data, model, pretraining, optimizers and step) and evaluates each
final model twice, as trained and after
:func:`talr_optax.nnx.reestimate_batch_norm` over ``--bn-batches`` training
batches. Both evaluations of a run share everything else, so the effect of
re-estimation is paired per run; SGDT against SGD is paired per seed.

No knob is tuned: both arms use the demo's defaults (SGD's cosine learning
rate, SGDT's ``lambda``), the same for every seed. To fit a few minutes per
seed on 2 CPU cores, QAT runs ``--epochs`` (default 20; the demo's 60) from
one full-precision model pretrained on seed 0 for the demo's 15 epochs; a
seed fixes the calibration batch and the data order.

Usage (from the repository root)::

  python benchmarks/bn_reestimation.py            # 10 seeds, 20 QAT epochs
  python benchmarks/bn_reestimation.py --quick    # 2 seeds, 2 + 1 epochs (smoke)

Writes ``benchmarks/results/bn_reestimation.json`` (``..._quick.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness  # noqa: E402  pylint: disable=wrong-import-position
import _stats  # noqa: E402  pylint: disable=wrong-import-position
from talr_optax import nnx as tnnx  # noqa: E402  pylint: disable=wrong-import-position

BITS = 2
METHODS = ("sgd", "talr")  # the demo's names: SGD and SGDT


def _demo():
  from talr_optax.demo import data, optim, tasks, train  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.config import DemoConfig  # pylint: disable=import-outside-toplevel
  return data, optim, tasks, train, DemoConfig


def config(quick: bool, seeds: int, epochs: int) -> Any:
  """The demo's ``--model mobilenet`` settings with ``epochs`` of QAT (2 + 1 with ``quick``)."""
  DemoConfig = _demo()[4]
  lengths = dict(epochs=2, fp_epochs=1) if quick else dict(epochs=epochs)
  return DemoConfig(model="mobilenet", bits=(BITS,), seeds=seeds, **lengths)


def qat_model(cfg: Any, dataset: Any, fp_model: nnx.Module, seed: int, method: str
              ) -> nnx.Module:
  """One of the demo's QAT runs (its calibration, optimizer, step, data order)."""
  _, _, tasks, train, _ = _demo()
  run = train.setup_qat(cfg, tasks.TASKS[cfg.dataset], dataset, fp_model, BITS, seed, method)
  log = train.RunLog()
  for _ in range(cfg.epochs):
    train.train_epoch(run, cfg, dataset, log.traces)
  return run.model


def bn_batches(cfg: Any, dataset: Any, n: int, seed: int) -> list[Any]:
  """``n`` augmented training batches, as training sees them (Nagel et al. use the train loader)."""
  data, _, tasks, _, _ = _demo()
  rng = np.random.default_rng(20_000 + seed)
  out: list[Any] = []
  while len(out) < n:
    for x, _ in data.batches(dataset.train, cfg.batch_size, rng=rng,
                             augment=tasks.TASKS[cfg.dataset].augment):
      out.append(jnp.asarray(x))
      if len(out) == n:
        break
  return out


def run(quick: bool, seeds: int, n_batches: int, epochs: int) -> dict[str, Any]:
  """Every (seed, method) run, evaluated before and after re-estimation."""
  _, _, tasks, train, _ = _demo()
  cfg = config(quick, seeds, epochs)
  task = tasks.TASKS[cfg.dataset]
  dataset = task.load(cfg)
  start = time.perf_counter()
  fp_model = train.pretrain_full_precision(cfg, task, dataset, 0)
  runs = []
  for seed in range(seeds):
    for method in METHODS:
      model = qat_model(cfg, dataset, fp_model, seed, method)
      before = train.evaluate(task, model, dataset.test)
      tnnx.reestimate_batch_norm(model, bn_batches(cfg, dataset, n_batches, seed))
      after = train.evaluate(task, model, dataset.test)
      runs.append({"seed": seed, "method": method, "test_accuracy": before,
                   "test_accuracy_bn_reestimated": after})
      print(f"seed {seed} {cfg.labels[method]}: {100 * before:.2f}% -> "
            f"{100 * after:.2f}% after BN re-estimation", flush=True)
  return {"config": dataclasses.asdict(cfg), "bn_batches": n_batches,
          "summary": summarize(runs, cfg.labels), "runs": runs,
          "seconds": time.perf_counter() - start}


def _accuracy(runs: list[dict[str, Any]], method: str, key: str) -> np.ndarray:
  return np.array([r[key] for r in sorted(runs, key=lambda r: r["seed"]) if r["method"] == method])


def _paired(diffs: np.ndarray) -> dict[str, Any]:
  """Accuracy differences (higher is better): the interval, and its conclusion."""
  p = _stats.paired_interval(-100.0 * diffs)  # _stats' convention: lower is better
  low, high = p["ci"]
  return {"mean": -p["mean"], "ci95": [-high, -low], "conclusion": _stats.conclusion(p["ci"]),
          "higher_on": int((diffs > 0).sum())}


def summarize(runs: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
  """Per method: mean accuracy before and after, and re-estimation's paired effect;
  then SGDT minus SGD, with and without re-estimation (percentage points)."""
  rows = []
  keys = ("test_accuracy", "test_accuracy_bn_reestimated")
  for method in METHODS:
    before, after = (_accuracy(runs, method, k) for k in keys)
    rows.append({"comparison": f"{labels[method]}: re-estimated minus as trained",
                 "mean_before": 100 * float(before.mean()),
                 "mean_after": 100 * float(after.mean()), **_paired(after - before)})
  for key, name in zip(keys, ("as trained", "re-estimated")):
    diff = _accuracy(runs, "talr", key) - _accuracy(runs, "sgd", key)
    rows.append({"comparison": f"{labels['talr']} minus {labels['sgd']}, {name}",
                 **_paired(diff)})
  return rows


def print_summary(results: dict[str, Any]) -> None:
  _harness.print_table(
      "MobileNetV2Tiny W2A2 on digits: BN re-estimation (test accuracy, percentage points)",
      ["comparison", "before", "after", "paired difference (95 % t)", "conclusion"],
      [[r["comparison"], f"{r['mean_before']:.2f}" if "mean_before" in r else "",
        f"{r['mean_after']:.2f}" if "mean_after" in r else "",
        f"{r['mean']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]", r["conclusion"]]
       for r in results["summary"]])


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Command line: ``--quick``, ``--seeds N``, ``--epochs N``, ``--bn-batches N``, ``--out FILE``."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="2 seeds, 2 + 1 epochs (smoke run)")
  ap.add_argument("--seeds", type=int, default=None, help="seeds (default 10; 2 with --quick)")
  ap.add_argument("--epochs", type=int, default=20, help="QAT epochs (default 20)")
  ap.add_argument("--bn-batches", type=int, default=50,
                  help="training batches for the re-estimation (default 50, as Nagel et al.)")
  ap.add_argument("--out", default=None,
                  help="results file (default benchmarks/results/bn_reestimation.json)")
  args = ap.parse_args(argv)
  seeds = args.seeds if args.seeds is not None else (2 if args.quick else 10)
  if seeds < 2:
    ap.error(f"--seeds must be an int >= 2 (a paired interval needs two), got {seeds}")
  if args.bn_batches < 1:
    ap.error(f"--bn-batches must be an int >= 1, got {args.bn_batches}")
  if args.epochs < 1:
    ap.error(f"--epochs must be an int >= 1, got {args.epochs}")
  # Before training: the commit recorded is the one that ran.
  meta = _harness.meta(sys.argv[1:] if argv is None else list(argv),
                       load_average_start=_harness.loadavg())
  results = run(args.quick, seeds, args.bn_batches, args.epochs)
  results["meta"] = meta | {"load_average": _harness.loadavg()}
  print_summary(results)
  path = _harness.results_path("bn_reestimation", args.quick, args.out)
  _harness.write_json(path, results)
  print(f"wrote {path} ({results['seconds']:.0f} s)")
  return results


if __name__ == "__main__":
  main()
