"""Which EMA momentum of ``K`` works across run lengths: a rule against fixed values.

TALR compares the target ``R`` with ``K``, an EMA of the measured transition
rate of momentum ``m`` (a horizon of ``1 / (1 - m)`` steps). The paper's
``m = 0.99`` averages over 100 steps: 10 % of a 1000-step run, where ``K``
then lags the falling cosine target. This benchmark trains AdamWT on the
demo's language-model task (``python -m talr_optax.demo --task lm``: the same
model, data, pretraining and optimizer, from ``talr_optax.demo.lm_train``) at
several run lengths, each with

* ``rule``: :func:`talr_optax.ema_momentum_for` of the run's length
  (``1 - 1/h``, ``h = T/50`` clipped to ``[10, 100]``: 0.95 at 1000 steps, 0.9875 at 4000),
* the fixed values 0.99 and 0.95,

and reports per length the tracking error ``|K - R| / R_0`` and the final
validation bits per byte, with the rule's paired differences against each
fixed value (same seed, same data order) and their 95 % t-intervals. Where
the rule equals a fixed value, the run is shared.

Usage (from the repository root)::

  python benchmarks/ema_momentum.py            # W2, 1000 and 4000 steps, 3 seeds
  python benchmarks/ema_momentum.py --quick    # 100 and 400 steps, 1 seed (smoke)

Writes ``benchmarks/results/ema_momentum.json`` (``ema_momentum_quick.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before jax: see qat_study.machine()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness  # noqa: E402  pylint: disable=wrong-import-position
import _stats  # noqa: E402  pylint: disable=wrong-import-position
import talr_optax as talr  # noqa: E402  pylint: disable=wrong-import-position

FIXED = (0.99, 0.95)


def candidates(steps: int) -> dict[str, float]:
  """``{"rule": m, "0.99": 0.99, "0.95": 0.95}`` for a run of ``steps``."""
  return {"rule": talr.ema_momentum_for(steps), **{f"{m:g}": m for m in FIXED}}


def run(lengths: Sequence[int], seeds: int, bits: int, fp_steps: int,
        eval_every: int) -> dict[str, Any]:
  """Trains every (length, momentum, seed) run; returns the JSON-ready results."""
  from talr_optax import demo  # pylint: disable=import-outside-toplevel
  from talr_optax.demo import lm_train  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.lm_config import LMConfig  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  base = LMConfig(fp_steps=fp_steps, eval_every=eval_every)
  data = lm_train.load(base)
  fp_model, pretraining = lm_train.pretrain(base, data, 0)
  runs, rows = [], []
  for steps in lengths:
    by_value: dict[float, dict[int, dict[str, float]]] = {}
    for name, m in candidates(steps).items():
      if m in by_value:
        continue
      cfg = LMConfig(fp_steps=fp_steps, eval_every=eval_every, steps=steps, ema_momentum=m)
      by_value[m] = {}
      for seed in range(seeds):
        r = demo.train_arm("lm", cfg, data, fp_model, bits=bits, seed=seed, method="talr")
        rec = {"steps": steps, "ema_momentum": m, "seed": seed,
               "final_bits_per_byte": r["final_bits_per_byte"],
               "tracking_error": r["tracking_error"]}
        by_value[m][seed] = rec
        runs.append(rec)
        print(f"T={steps} m={m:.4f} seed {seed}: {rec['final_bits_per_byte']:.4f} bits/byte, "
              f"|K-R|/R0 {rec['tracking_error']:.3f}", flush=True)
    rule = candidates(steps)["rule"]
    for name, m in candidates(steps).items():
      sel = [by_value[m][s] for s in range(seeds)]
      row = {"steps": steps, "candidate": name, "ema_momentum": m, "seeds": seeds}
      for key in ("final_bits_per_byte", "tracking_error"):
        row[key] = _stats.paired_interval([r[key] for r in sel])["mean"]
        if name != "rule":
          diff = _stats.paired_interval([by_value[rule][s][key] - by_value[m][s][key]
                                         for s in range(seeds)])
          row[f"rule_minus_this_{key}"] = diff["mean"]
          row[f"rule_minus_this_{key}_ci95"] = diff["ci"]
      rows.append(row)
  return {"bits": bits, "lengths": list(lengths), "seeds": seeds,
          "pretraining_bits_per_byte": pretraining["final_bits_per_byte"],
          "summary": rows, "runs": runs, "seconds": time.perf_counter() - start}


def _cell(row: dict[str, Any], key: str) -> str:
  if f"rule_minus_this_{key}" not in row:
    return ""
  low, high = row[f"rule_minus_this_{key}_ci95"]
  return f"{row[f'rule_minus_this_{key}']:+.4f} [{low:+.4f}, {high:+.4f}]"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Command line: ``--quick``, ``--seeds``, ``--lengths``, ``--bits``, ``--out``."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="100 and 400 steps, 1 seed")
  ap.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick 1)")
  ap.add_argument("--lengths", default=None, help="QAT steps, comma-separated "
                  "(default 1000,4000; quick 100,400)")
  ap.add_argument("--bits", type=int, default=2, help="weight bits (default 2)")
  ap.add_argument("--out", default=None, help="output JSON path")
  args = ap.parse_args(argv)
  lengths = tuple(int(x) for x in (args.lengths or ("100,400" if args.quick else "1000,4000")
                                   ).split(","))
  seeds = args.seeds or (1 if args.quick else 3)
  result = run(lengths, seeds, args.bits, 200 if args.quick else 2000,
               50 if args.quick else 100)
  result["machine"] = _harness.meta(sys.argv if argv is None else argv,
                                    onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA"),
                                    load_average=_harness.loadavg())
  _harness.print_table(
      f"AdamWT W{args.bits}, EMA momentum of K ({seeds} seeds; rule - fixed, paired, 95 % t)",
      ["steps", "m", "bits/byte", "|K-R|/R0", "rule - this: bits/byte", "rule - this: |K-R|/R0"],
      [[r["steps"], f"{r['candidate']} ({r['ema_momentum']:.4f})",
        f"{r['final_bits_per_byte']:.4f}", f"{r['tracking_error']:.3f}",
        _cell(r, "final_bits_per_byte"), _cell(r, "tracking_error")] for r in result["summary"]])
  _harness.write_json(_harness.results_path("ema_momentum", args.quick, args.out), result)
  return result


if __name__ == "__main__":
  main()
