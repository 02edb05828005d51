"""What the oscillation remedies cost: one optimizer step, against plain AdamW.

Times the jitted step ``tx.update`` + ``optax.apply_updates`` (params and
state donated) on the ten conv-shaped float32 tensors of
``optimizer_step.py``, all quantized to 2 bits:

* ``adamw``: ``chain(scale_by_adam, add_decayed_weights(1e-4),
  scale_by_learning_rate(1e-3))``, the baseline of every row;
* ``adamw_dampen``: ``dampen_oscillations(centers_fn, 1e-3)`` in front;
* ``adamw_freeze``: ``freeze_oscillations(levels_fn, centers_fn, 0.02)`` last;
* ``adamwt``: ``talr_optax.adamwt`` (exact counting);
* ``adamwt_freeze``: ``adamwt(..., freeze_threshold=0.02)``, the freezing
  wrapped around TALR's stage.

Same method as the other figures (``_harness.py``): variants compiled and
warmed up, then timed in interleaved rounds; the ratio is the median against
``adamw``'s, with the IQR of the paired per-round ratios. It also reports the
optimizer state's bytes per quantized weight (from ``jax.eval_shape``,
machine-independent).

Usage:
  python benchmarks/remedies_step.py --quick   # 0.1M, 15 rounds
  python benchmarks/remedies_step.py           # 1M and 10M, 25 rounds
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # pylint: disable=wrong-import-position

import talr_optax as talr  # pylint: disable=wrong-import-position

VARIANTS = ("adamw", "adamw_dampen", "adamw_freeze", "adamwt", "adamwt_freeze")
THRESHOLD = 0.02
STRENGTH = 1e-3


def optimizer(variant: str, scales) -> optax.GradientTransformation:
  levels_fn = talr.levels_fn_from_scales(scales, bits=H.BITS)
  centers_fn = talr.centers_fn_from_scales(scales, bits=H.BITS)
  adamw = optax.adamw(H.ADAM_LR, weight_decay=H.WEIGHT_DECAY)
  adamwt = lambda **kw: talr.adamwt(H.ADAM_LR, H.TARGET, levels_fn,
                                    weight_decay=H.WEIGHT_DECAY, **kw)
  return {
      "adamw": lambda: adamw,
      "adamw_dampen": lambda: optax.chain(talr.dampen_oscillations(centers_fn, STRENGTH), adamw),
      "adamw_freeze": lambda: optax.chain(
          adamw, talr.freeze_oscillations(levels_fn, centers_fn, THRESHOLD)),
      "adamwt": adamwt,
      "adamwt_freeze": lambda: adamwt(freeze_threshold=THRESHOLD, centers_fn=centers_fn),
  }[variant]()


def run(sizes, variants, repeats, warmup, seed=0):
  results = []
  for size in sizes:
    n = H.n_weights(size)
    params0, grads, scales = H.make_problem(size, seed)
    runners, state_bytes = {}, {}
    for v in variants:
      tx = optimizer(v, scales)
      state_bytes[v] = H.tree_nbytes(jax.eval_shape(tx.init, params0)) / n
      params = H.copy_tree(params0)
      runners[v] = H.stepper(H.jitted_step(tx, donate=True), params, tx.init(params), grads,
                             warmup)
    load0 = H.loadavg()
    raw = H.time_interleaved(runners, repeats, seed)
    load1 = H.loadavg()
    stats = H.summarize(raw, {v: "adamw" for v in variants})
    rows = []
    for v in variants:
      s = stats[v]
      results.append(dict(size=size, n_weights=n, variant=v,
                          state_bytes_per_weight=state_bytes[v], loadavg_before=load0,
                          loadavg_after=load1, times_ms=[x * 1e3 for x in raw[v]["t"]], **s))
      rows.append([v, s["median_ms"], s["iqr_ms"], "" if v == "adamw" else H.ratio_cell(s),
                   state_bytes[v]])
    H.print_table(f"optimizer step, {size} ({n:,} weights), {repeats} rounds,"
                  f" load {load0} -> {load1}",
                  ["variant", "median ms", "IQR ms", "ratio [paired IQR]", "state B/w"], rows)
  return results


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="0.1M, 15 rounds")
  ap.add_argument("--sizes", default=None, help="comma list of " + ",".join(H.SIZES))
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--out", default=None,
                  help="JSON path (default results/remedies_step[_quick].json)")
  args = ap.parse_args(argv)
  sizes = (args.sizes or ("0.1M" if args.quick else "1M,10M")).split(",")
  repeats = args.repeats or (15 if args.quick else 25)
  t0 = time.perf_counter()
  rows = run(sizes, list(VARIANTS), repeats, args.warmup)
  m = H.meta(sys.argv[1:] if argv is None else argv, repeats=repeats, warmup=args.warmup,
             bits=H.BITS, threshold=THRESHOLD, strength=STRENGTH,
             seconds=time.perf_counter() - t0)
  H.write_json(H.results_path("remedies_step", args.quick, args.out), dict(meta=m, rows=rows))
  return rows


if __name__ == "__main__":
  main()
