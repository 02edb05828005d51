"""Figure 1 (and the data of figure 5): one optimizer step, TALR vs plain Optax.

Times the jitted step ``tx.update`` + ``optax.apply_updates`` on ten
conv-shaped float32 weight tensors (HWIO) of about 1M, 10M and 50M weights in
total, all quantized to 2-bit levels (``talr_optax.levels_fn_from_scales``
with the frozen step size ``3 std(w)``):

* ``sgd``  : ``chain(add_decayed_weights(1e-4), trace(0.9), scale_by_learning_rate(0.1))``
* ``sgdt`` : ``talr_optax.sgdt(0.1, R, levels_fn, momentum=0.9, weight_decay=1e-4)``,
  i.e. the same chain with ``scale_by_talr`` last; levels computed from the
  params inside the step (``levels_fn(params)``);
* ``sgdt_levels``: ``sgdt`` given ``levels=`` (the integer levels a forward
  pass has computed anyway), so the step does not recompute them;
* ``adam`` / ``adamt`` / ``adamt_levels``: the same with ``scale_by_adam``
  (coupled weight decay, ``talr_optax.adamt``).

Params and optimizer state are donated to the step (``donate_argnums``, what a
training loop does) and, in the full run, also not donated: without donation
XLA:CPU allocates new output buffers every step, with donation it writes in
place, and the page faults of fresh allocations change the picture.

Method (``_harness.py``): all variants of one size and donation mode are
compiled, warmed up, then timed in interleaved rounds (one call each, order
shuffled per round, ``jax.block_until_ready`` at the end of each call).
Reported: median and IQR (ms) of the rounds, the ratio of medians against the
plain optimizer, the IQR of the paired per-round ratios, the median minor page
faults per call, ns per weight, and from the compiled HLO the bytes per weight
that the step's top-level ops read and write (``HLO B/w``: every operand and
output of at least a tensor's size, counted once per op).

Usage:
  python benchmarks/optimizer_step.py --quick   # 0.1M and 1M, donated, 20 rounds (~1 min)
  python benchmarks/optimizer_step.py           # 1M, 10M, 50M, donated and not, 25 rounds
  python benchmarks/optimizer_step.py --sizes 10M --donate yes --repeats 40
  python benchmarks/optimizer_step.py --hlo sgdt --sizes 1M   # print the compiled HLO
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # pylint: disable=wrong-import-position

import talr_optax as talr  # pylint: disable=wrong-import-position

# variant -> (optimizer, levels passed in, baseline)
VARIANTS = {
    "sgd": ("sgd", False, "sgd"),
    "sgdt": ("sgdt", False, "sgd"),
    "sgdt_levels": ("sgdt", True, "sgd"),
    "adam": ("adam", False, "adam"),
    "adamt": ("adamt", False, "adam"),
    "adamt_levels": ("adamt", True, "adam"),
}


def build(variant: str, scales, donate: bool):
  """(tx, jitted step); the step takes (params, state, grads[, levels])."""
  levels_fn = talr.levels_fn_from_scales(scales, bits=H.BITS)
  opt, with_levels, _ = VARIANTS[variant]
  tx = H.optimizers(levels_fn)[opt]
  donate_argnums = (0, 1) if donate else ()
  if with_levels:
    def step(params, state, grads, levels):
      updates, state = tx.update(grads, state, params, levels=levels)
      return optax.apply_updates(params, updates), state
  else:
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
  return tx, levels_fn, jax.jit(step, donate_argnums=donate_argnums)


def _copy(tree):
  return jax.tree.map(lambda x: x.copy(), tree)


def run(sizes, variants, donate_modes, repeats, warmup, seed=0):
  results = []
  for size in sizes:
    n = H.n_weights(size)
    n_tensors = len(H.SIZES[size])
    params0, grads, scales = H.make_problem(size, seed)
    for donate in donate_modes:
      runners, hlo = {}, {}
      for v in variants:
        tx, levels_fn, fn = build(v, scales, donate)
        holder = {"p": _copy(params0)}
        holder["s"] = tx.init(holder["p"])
        args = (grads,)
        if VARIANTS[v][1]:
          args = (grads, jax.jit(levels_fn)(params0))
        hlo[v] = H.hlo_summary(fn.lower(holder["p"], holder["s"], *args).compile().as_text(),
                               n, n_tensors)

        def call(holder=holder, fn=fn, args=args):
          holder["p"], holder["s"] = fn(holder["p"], holder["s"], *args)
          jax.block_until_ready((holder["p"], holder["s"]))

        for _ in range(1 + warmup):
          call()
        runners[v] = call
      load0 = H.loadavg()
      t0 = time.perf_counter()
      raw = H.time_interleaved(runners, repeats, seed)
      wall = time.perf_counter() - t0
      stats = H.summarize(raw, {v: VARIANTS[v][2] for v in variants})
      rows = []
      for v in variants:
        s = stats[v]
        results.append(dict(size=size, n_weights=n, n_tensors=n_tensors, donate=donate,
                            variant=v, optimizer=VARIANTS[v][0], levels_passed=VARIANTS[v][1],
                            ns_per_weight=s["median_ms"] * 1e6 / n,
                            hlo_bytes_per_weight=hlo[v]["bytes_per_weight"],
                            hlo_ops_per_tensor=hlo[v]["ops_per_tensor"],
                            hlo_op_kinds=hlo[v]["op_kinds"],
                            loadavg_before=load0, loadavg_after=H.loadavg(),
                            times_ms=[x * 1e3 for x in raw[v]["t"]],
                            minflt=raw[v]["faults"], **s))
        rows.append([v, s["median_ms"], s["iqr_ms"],
                     "" if s["baseline"] == v else H.ratio_cell(s),
                     s["minflt_median"], s["median_ms"] * 1e6 / n,
                     hlo[v]["bytes_per_weight"], hlo[v]["ops_per_tensor"]])
      H.print_table(
          f"optimizer step, {size} ({n:,} weights, {n_tensors} tensors), donate={donate},"
          f" {repeats} rounds in {wall:.0f} s, load {load0}",
          ["variant", "median ms", "IQR ms", "ratio [paired IQR]", "faults", "ns/w",
           "HLO B/w", "ops/tensor"], rows)
      del runners, holder
      gc.collect()
  return results


def print_hlo(variant: str, size: str, donate: bool) -> None:
  params, grads, scales = H.make_problem(size)
  tx, levels_fn, fn = build(variant, scales, donate)
  state = tx.init(params)
  args = (grads, levels_fn(params)) if VARIANTS[variant][1] else (grads,)
  text = fn.lower(params, state, *args).compile().as_text()
  print(text)
  n, nt = H.n_weights(size), len(H.SIZES[size])
  print("\n# large-array ops of ENTRY:")
  for o in H.hlo_passes(text, min_elems=max(1024, n // (4 * nt))):
    print(f"#  {o['name']:40s} {o['op']:12s} {o['kind']:8s} read {o['read_bytes'] / (n / nt):5.1f}"
          f" B/w  write {o['write_bytes'] / (n / nt):5.1f} B/w")
  print("#", H.hlo_summary(text, n, nt))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="0.1M and 1M, donated, 20 rounds")
  ap.add_argument("--sizes", default=None, help="comma list of " + ",".join(H.SIZES))
  ap.add_argument("--variants", default=None, help="comma list of " + ",".join(VARIANTS))
  ap.add_argument("--donate", choices=["yes", "no", "both"], default=None)
  ap.add_argument("--repeats", type=int, default=None, help="timed rounds (>= 20 for reports)")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--hlo", default=None, metavar="VARIANT", help="print the compiled HLO and exit")
  ap.add_argument("--out", default=None, help="JSON path (default results/optimizer_step[_quick].json)")
  args = ap.parse_args(argv)
  sizes = (args.sizes or ("0.1M,1M" if args.quick else "1M,10M,50M")).split(",")
  donate = args.donate or ("yes" if args.quick else "both")
  donate_modes = {"yes": [True], "no": [False], "both": [True, False]}[donate]
  if args.hlo:
    print_hlo(args.hlo, sizes[0], donate_modes[0])
    return None
  variants = args.variants.split(",") if args.variants else list(VARIANTS)
  for v in list(variants):  # every variant needs its baseline in the same rounds
    if VARIANTS[v][2] not in variants:
      variants.insert(0, VARIANTS[v][2])
  repeats = args.repeats or (20 if args.quick else 25)
  out = H.results_path("optimizer_step", args.quick, args.out)
  print(f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, load {H.loadavg()}")
  t0 = time.perf_counter()
  rows = run(sizes, variants, donate_modes, repeats, args.warmup, args.seed)
  m = H.meta(sys.argv[1:] if argv is None else argv, repeats=repeats, warmup=args.warmup,
             bits=H.BITS, seconds=time.perf_counter() - t0)
  H.write_json(out, dict(meta=m, rows=rows))
  return rows


if __name__ == "__main__":
  main()
