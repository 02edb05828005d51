"""Figure 5: ns per weight against the number of quantized weights, TALR and plain.

Reads the optimizer-step measurements of ``optimizer_step.py``
(``results/optimizer_step.json``; with ``--quick`` the quick file), running
that script first if the file is missing or ``--run`` is given, so both
figures come from the same interleaved rounds. For ``sgd`` / ``sgdt`` /
``sgdt_sampled`` (and ``adam`` / ``adamt`` / ``adamt_sampled``) it prints the
median step time, ns per weight and ratio to the plain optimizer at each size,
and fits ``t = a + b N`` (least squares on the medians):

* ``a`` (ms): fixed cost per step, independent of the size (dispatch and the
  per-tensor scalar work: TALR adds a few small kernels per quantized tensor);
* ``b`` (ns/weight): cost per weight; ``b_TALR / b_plain`` is the overhead
  fraction that remains at large sizes.

The overhead is a constant fraction if the ratio is the same at every size,
i.e. if ``a`` is small against ``b N``. With ``sample_size`` the count and the
stored levels stop growing with the tensor, so ``sgdt_sampled``'s ns per
weight should approach ``sgd``'s as ``N`` grows. ``--plot out.png`` draws ns
per weight against ``N`` (matplotlib, from the ``demo`` extra).

Usage:
  python benchmarks/scaling.py --quick         # from optimizer_step_quick.json (0.1M, 1M)
  python benchmarks/scaling.py                 # from optimizer_step.json (1M, 10M, 50M)
  python benchmarks/scaling.py --run --plot benchmarks/results/scaling.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # pylint: disable=wrong-import-position

GROUPS = (("sgd", ("sgd", "sgdt", "sgdt_sampled")), ("adam", ("adam", "adamt", "adamt_sampled")))


def fit(ns, ts):
  """Least squares t = a + b n; returns (a in ms, b in ns/weight)."""
  ns, ts = np.asarray(ns, float), np.asarray(ts, float)
  if len(ns) < 2:
    return float("nan"), float("nan")
  b, a = np.polyfit(ns, ts, 1)
  return float(a), float(b * 1e6)


def analyse(rows):
  out = []
  for donate in sorted({r["donate"] for r in rows}, reverse=True):
    for base, variants in GROUPS:
      sub = [r for r in rows if r["donate"] == donate and r["variant"] in variants]
      if not sub:
        continue
      sizes = sorted({r["n_weights"] for r in sub})
      fits = {}
      for v in variants:
        pts = sorted((r["n_weights"], r["median_ms"]) for r in sub if r["variant"] == v)
        if pts:
          fits[v] = fit(*zip(*pts))
      for v in variants:
        if v not in fits:
          continue
        by_n = {r["n_weights"]: r for r in sub if r["variant"] == v}
        out.append(dict(
            donate=donate, baseline=base, variant=v, sizes=sizes,
            median_ms=[by_n[n]["median_ms"] if n in by_n else None for n in sizes],
            iqr_ms=[by_n[n]["iqr_ms"] if n in by_n else None for n in sizes],
            ns_per_weight=[by_n[n]["ns_per_weight"] if n in by_n else None for n in sizes],
            ratio=[by_n[n]["ratio"] if n in by_n else None for n in sizes],
            fixed_ms=fits[v][0], per_weight_ns=fits[v][1],
            per_weight_ratio=fits[v][1] / fits[base][1] if base in fits else None))
  return out


def print_tables(res):
  for donate in sorted({r["donate"] for r in res}, reverse=True):
    sub = [r for r in res if r["donate"] == donate]
    sizes = sub[0]["sizes"]
    hdr = ["variant"] + [f"{n / 1e6:.1f}M ms" for n in sizes] + [f"{n / 1e6:.1f}M ns/w" for n in sizes] \
        + [f"{n / 1e6:.1f}M ratio" for n in sizes] + ["fit a ms", "fit b ns/w", "b / b_plain"]
    H.print_table(
        f"scaling, donate={donate}: median step time, ns per weight, ratio of medians, fit t = a + b N",
        hdr,
        [[r["variant"]] + [x for x in r["median_ms"]] + [x for x in r["ns_per_weight"]]
         + ["" if r["variant"] == r["baseline"] else f"{x:.3f}" for x in r["ratio"]]
         + [r["fixed_ms"], r["per_weight_ns"],
            "" if r["per_weight_ratio"] is None else f"{r['per_weight_ratio']:.3f}"]
         for r in sub])


def plot(res, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  bases = [b for b, _ in GROUPS if any(r["baseline"] == b for r in res)]
  fig, axes = plt.subplots(1, len(bases), figsize=(6 * len(bases), 4.5), squeeze=False)
  for ax, base in zip(axes[0], bases):
    for r in (r for r in res if r["baseline"] == base):
      ns = np.asarray(r["sizes"]) / 1e6
      nspw = np.asarray(r["ns_per_weight"], float)
      err = np.asarray(r["iqr_ms"], float) * 1e6 / np.asarray(r["sizes"]) / 2
      ax.errorbar(ns, nspw, yerr=err, marker="o", capsize=3,
                  label=f"{r['variant']} (donate={r['donate']})",
                  linestyle="-" if r["variant"] == r["baseline"] else "--")
    ax.set_xscale("log")
    ax.set_xlabel("quantized weights (millions)")
    ax.set_ylabel("ns per weight (median; bars: IQR / 2)")
    ax.set_title(f"optimizer step, {base} vs TALR")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--input", default=None, help="optimizer_step JSON to read")
  ap.add_argument("--run", action="store_true", help="run optimizer_step.py first")
  ap.add_argument("--plot", default=None, metavar="PNG")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  src = H.results_path("optimizer_step", args.quick, args.input)
  t0 = time.perf_counter()
  if args.run or not os.path.exists(src):
    import optimizer_step  # pylint: disable=import-outside-toplevel
    optimizer_step.main((["--quick"] if args.quick else []) + ["--out", src])
  with open(src) as f:
    data = json.load(f)
  res = analyse(data["rows"])
  print_tables(res)
  if args.plot:
    plot(res, args.plot)
  out = H.results_path("scaling", args.quick, args.out)
  # Record the source relative to the repository, not as a machine path.
  source = os.path.relpath(src, os.path.dirname(os.path.dirname(H.RESULTS_DIR)))
  H.write_json(out, dict(meta=H.meta(sys.argv[1:] if argv is None else argv, source=source,
                                     source_meta=data.get("meta"),
                                     seconds=time.perf_counter() - t0), rows=res))
  return res


if __name__ == "__main__":
  main()
