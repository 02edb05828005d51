"""Figure 1 (and the data of figure 5): one optimizer step, TALR vs plain Optax.

Times the jitted step ``tx.update`` + ``optax.apply_updates`` on ten
conv-shaped float32 weight tensors (HWIO) of about 1M, 10M and 50M weights in
total, all quantized to 2-bit levels (``talr_optax.levels_fn_from_scales``
with the frozen step size ``3 std(w)``):

* ``sgd``  : ``chain(add_decayed_weights(1e-4), trace(0.9), scale_by_learning_rate(0.1))``;
* ``sgdt`` : ``talr_optax.sgdt(0.1, R, levels_fn, momentum=0.9, weight_decay=1e-4)``,
  the same chain with ``scale_by_talr`` last: it scales the update by the
  rate ``U`` of earlier steps, then counts every transition the update causes
  (levels of the new params against the stored int8 levels);
* ``sgdt_sampled``: ``sgdt`` with ``sample_size=65536``: the transitions of
  each tensor are counted, and its levels stored, on a fixed strided grid of
  at most 65,536 weights;
* ``adam`` / ``adamt`` / ``adamt_sampled``: the same with ``scale_by_adam``
  (coupled weight decay, ``talr_optax.adamt``).

Params and optimizer state are donated to the step (``donate_argnums``, what a
training loop does); ``--donate no`` or ``both`` also times fresh output
buffers (XLA:CPU then allocates every step, and page faults change the
picture).

Method (``_harness.py``): all variants of one size are compiled, warmed up,
then timed in interleaved rounds (one call each, order shuffled per round,
``jax.block_until_ready`` at the end of each call). Reported: median and IQR
(ms) of the rounds, the ratio of medians against the plain optimizer, the IQR
of the paired per-round ratios, the median minor page faults per call, ns per
weight, the load average before and after the rounds, and from the compiled
HLO: the bytes per weight that the step's top-level ops read and write
(``HLO B/w``), the part of them in TALR's level, count and copy passes, the
number of large-array ops per tensor, and whether any op writing new params
or moments waits for a transition count (``waits``: it must not).

Usage:
  python benchmarks/optimizer_step.py --quick   # 0.1M and 1M, 20 rounds
  python benchmarks/optimizer_step.py           # 1M, 10M, 50M, 25 rounds
  python benchmarks/optimizer_step.py --sizes 10M --variants sgdt,sgdt_sampled --repeats 40
  python benchmarks/optimizer_step.py --hlo sgdt --sizes 1M   # compiled HLO + its passes
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # pylint: disable=wrong-import-position

import talr_optax as talr  # pylint: disable=wrong-import-position

# variant -> baseline (the plain optimizer it is compared with in the same rounds)
VARIANTS = {
    "sgd": "sgd",
    "sgdt": "sgd",
    "sgdt_sampled": "sgd",
    "adam": "adam",
    "adamt": "adam",
    "adamt_sampled": "adam",
}


def build(variant: str, scales, donate: bool, sample_size: int = H.SAMPLE_SIZE):
  """(tx, jitted step); the step takes (params, state, grads)."""
  levels_fn = talr.levels_fn_from_scales(scales, bits=H.BITS)
  tx = H.optimizers(levels_fn, sample_size)[variant]
  return tx, H.jitted_step(tx, donate)


def _role_cell(h) -> str:
  """Bytes per weight of the TALR-specific roles: levels + count + copies."""
  r = h["bytes_per_weight_by_role"]
  return "/".join(f"{r.get(k, 0.0):.1f}" for k in ("levels", "count", "copy"))


def run(sizes, variants, donate_modes, repeats, warmup, seed=0, sample_size=H.SAMPLE_SIZE):
  results = []
  for size in sizes:
    n = H.n_weights(size)
    n_tensors = len(H.SIZES[size])
    params0, grads, scales = H.make_problem(size, seed)
    for donate in donate_modes:
      runners, hlo = {}, {}
      for v in variants:
        tx, fn = build(v, scales, donate, sample_size)
        params = H.copy_tree(params0)
        state = tx.init(params)
        hlo[v] = H.hlo_summary(fn.lower(params, state, grads).compile().as_text(),
                               n, n_tensors)
        runners[v] = H.stepper(fn, params, state, grads, warmup)
      del params, state  # undonated first inputs: not kept alive while timing
      load0 = H.loadavg()
      t0 = time.perf_counter()
      raw = H.time_interleaved(runners, repeats, seed)
      wall = time.perf_counter() - t0
      load1 = H.loadavg()
      stats = H.summarize(raw, {v: VARIANTS[v] for v in variants})
      rows = []
      for v in variants:
        s = stats[v]
        results.append(dict(size=size, n_weights=n, n_tensors=n_tensors, donate=donate,
                            variant=v, sample_size=sample_size if "sampled" in v else None,
                            ns_per_weight=s["median_ms"] * 1e6 / n,
                            hlo_bytes_per_weight=hlo[v]["bytes_per_weight"],
                            hlo_bytes_per_weight_by_role=hlo[v]["bytes_per_weight_by_role"],
                            hlo_ops_per_tensor=hlo[v]["ops_per_tensor"],
                            hlo_op_kinds=hlo[v]["op_kinds"],
                            hlo_update_waits_for_count=hlo[v]["update_waits_for_count"],
                            loadavg_before=load0, loadavg_after=load1,
                            times_ms=[x * 1e3 for x in raw[v]["t"]],
                            minflt=raw[v]["faults"], **s))
        rows.append([v, s["median_ms"], s["iqr_ms"],
                     "" if s["baseline"] == v else H.ratio_cell(s),
                     s["minflt_median"], s["median_ms"] * 1e6 / n,
                     hlo[v]["bytes_per_weight"], _role_cell(hlo[v]), hlo[v]["ops_per_tensor"],
                     "yes" if hlo[v]["update_waits_for_count"] else "no"])
      H.print_table(
          f"optimizer step, {size} ({n:,} weights, {n_tensors} tensors), donate={donate},"
          f" {repeats} rounds in {wall:.1f} s, load {load0} -> {load1}",
          ["variant", "median ms", "IQR ms", "ratio [paired IQR]", "faults", "ns/w",
           "HLO B/w", "lev/cnt/copy B/w", "ops/tensor", "waits"], rows)
      del runners
      gc.collect()
  return results


def print_hlo(variant: str, size: str, donate: bool, sample_size: int = H.SAMPLE_SIZE) -> None:
  params, grads, scales = H.make_problem(size)
  tx, fn = build(variant, scales, donate, sample_size)
  state = tx.init(params)
  text = fn.lower(params, state, grads).compile().as_text()
  print(text)
  n, nt = H.n_weights(size), len(H.SIZES[size])
  print(f"\n# large-array ops of ENTRY (bytes per weight of one tensor, {n // nt:,} weights):")
  for o in H.hlo_passes(text, min_elems=H.hlo_min_elems(n, nt)):
    print(f"#  {o['name']:32s} {o['op']:8s} {o['kind']:8s} {o['role']:7s}"
          f" read {o['read_bytes'] / (n / nt):5.2f}  write {o['write_bytes'] / (n / nt):5.2f}"
          f"{'  waits for a count' if o['waits_for_count'] else ''}")
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
  ap.add_argument("--sample-size", type=int, default=H.SAMPLE_SIZE,
                  help="sample_size of the *_sampled variants")
  ap.add_argument("--hlo", default=None, metavar="VARIANT",
                  help="print the compiled HLO of one variant at the first size, and the"
                  " table of its large-array ops, and exit")
  ap.add_argument("--out", default=None, help="JSON path (default results/optimizer_step[_quick].json)")
  args = ap.parse_args(argv)
  sizes = (args.sizes or ("0.1M,1M" if args.quick else "1M,10M,50M")).split(",")
  donate = args.donate or "yes"
  donate_modes = {"yes": [True], "no": [False], "both": [True, False]}[donate]
  if args.hlo:
    print_hlo(args.hlo, sizes[0], donate_modes[0], args.sample_size)
    return None
  variants = args.variants.split(",") if args.variants else list(VARIANTS)
  for v in list(variants):  # every variant needs its baseline in the same rounds
    if VARIANTS[v] not in variants:
      variants.insert(0, VARIANTS[v])
  repeats = args.repeats or (20 if args.quick else 25)
  out = H.results_path("optimizer_step", args.quick, args.out)
  print(f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, load {H.loadavg()}")
  t0 = time.perf_counter()
  rows = run(sizes, variants, donate_modes, repeats, args.warmup, args.seed, args.sample_size)
  m = H.meta(sys.argv[1:] if argv is None else argv, repeats=repeats, warmup=args.warmup,
             bits=H.BITS, sample_size=args.sample_size, seconds=time.perf_counter() - t0)
  H.write_json(out, dict(meta=m, rows=rows))
  return rows


if __name__ == "__main__":
  main()
