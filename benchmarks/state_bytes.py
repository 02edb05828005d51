"""Figure 3: extra optimizer state of TALR per quantized weight, from the state's nbytes.

For each setting, the optimizer state of the plain optimizer and of its TALR
counterpart is built and its bytes summed exactly (``shape`` x ``itemsize`` of
every leaf; the tensor settings use ``jax.eval_shape`` so no memory is
allocated). Reported: both totals, the difference, the difference per
quantized weight, and its two parts: the int8 previous levels (``prev_levels``,
1 byte per quantized weight) and the per-tensor float32 rates plus the int32
step count (a constant per tensor, independent of its size).

Settings: the ten conv tensors of ``optimizer_step.py`` at each size (all
quantized, 2-bit), and the NNX ResNet-20 W2A2 of ``train_step.py`` (18
quantized kernels; the state of the whole ``optax.partition``, so the plain
groups count on both sides).

Packing (the stretch goal, b/8 byte per weight for b-bit levels) is not
implemented; the table shows what it would give for 2-bit levels.

Usage:
  python benchmarks/state_bytes.py --quick   # 1M and ResNet-20
  python benchmarks/state_bytes.py           # 1M, 10M, 50M and ResNet-20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # pylint: disable=wrong-import-position

import talr_optax as talr  # pylint: disable=wrong-import-position

PAIRS = (("sgd", "sgdt"), ("adam", "adamt"))


def _talr_parts(state) -> dict[str, int]:
  """Bytes of the ScaleByTALRState fields found in a (possibly nested) state."""
  found = {}

  def visit(node):
    if isinstance(node, talr.ScaleByTALRState):
      for field in node._fields:
        found[field] = found.get(field, 0) + H.tree_nbytes(getattr(node, field))
      return
    if isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, dict):
      for child in node.values():
        visit(child)
    elif hasattr(node, "inner_states"):  # optax.partition
      visit(node.inner_states)
    elif hasattr(node, "inner_state"):  # optax.MaskedState
      visit(node.inner_state)

  visit(state)
  return found


def _row(setting, n_quantized, n_tensors, plain, plain_state, tal, tal_state):
  pb, tb = H.tree_nbytes(plain_state), H.tree_nbytes(tal_state)
  parts = _talr_parts(tal_state)
  levels = parts.get("prev_levels", 0)
  scalars = sum(v for k, v in parts.items() if k != "prev_levels")
  extra = tb - pb
  return dict(setting=setting, n_quantized=n_quantized, n_quantized_tensors=n_tensors,
              plain=plain, talr=tal, plain_bytes=pb, talr_bytes=tb, extra_bytes=extra,
              extra_bytes_per_quantized_weight=extra / n_quantized,
              prev_levels_bytes=levels, prev_levels_bytes_per_weight=levels / n_quantized,
              rate_scalar_bytes=scalars, rate_scalar_bytes_per_tensor=scalars / n_tensors,
              other_extra_bytes=extra - levels - scalars,
              packed_2bit_levels_bytes=int(np.ceil(n_quantized / 4)))


def tensor_rows(size: str) -> list[dict]:
  shapes = H.SIZES[size]
  params = {f"conv{i:02d}": jax.ShapeDtypeStruct(s, np.float32) for i, s in enumerate(shapes)}
  scales = {k: 0.1 for k in params}
  levels_fn = talr.levels_fn_from_scales(scales, bits=H.BITS)
  txs = H.optimizers(levels_fn)
  n = H.n_weights(size)
  rows = []
  for plain, tal in PAIRS:
    ps = jax.eval_shape(txs[plain].init, params)
    ts = jax.eval_shape(txs[tal].init, params)
    rows.append(_row(f"{size} conv tensors", n, len(shapes), plain, ps, tal, ts))
  return rows


def resnet_rows() -> list[dict]:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import train_step as TS  # pylint: disable=import-outside-toplevel
  import talr_optax.nnx as tnnx  # pylint: disable=import-outside-toplevel
  rows = []
  for plain, tal in PAIRS:
    states = {}
    for v in (plain, tal):
      model, _ = TS.make_model("resnet20", 0)
      opt = nnx.Optimizer(model, TS.make_tx(v, model), wrt=nnx.Param)
      states[v] = opt.opt_state
      lv = jax.tree.leaves(tnnx.levels_fn_for(model)(nnx.state(model, nnx.Param)))
    n = int(sum(np.size(l) for l in lv))
    rows.append(_row("ResNet-20 W2A2 (whole partition)", n, len(lv), plain, states[plain],
                     tal, states[tal]))
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="1M and ResNet-20")
  ap.add_argument("--sizes", default=None, help="comma list of " + ",".join(H.SIZES))
  ap.add_argument("--no-resnet", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  sizes = (args.sizes or ("1M" if args.quick else "1M,10M,50M")).split(",")
  t0 = time.perf_counter()
  rows = [r for s in sizes for r in tensor_rows(s)]
  if not args.no_resnet:
    rows += resnet_rows()
  H.print_table(
      "optimizer state bytes (exact, from nbytes)",
      ["setting", "pair", "quantized w", "plain B", "TALR B", "extra B", "extra B/qw",
       "levels B/qw", "rates B/tensor"],
      [[r["setting"], f"{r['talr']} vs {r['plain']}", r["n_quantized"], r["plain_bytes"],
        r["talr_bytes"], r["extra_bytes"], f"{r['extra_bytes_per_quantized_weight']:.6f}",
        f"{r['prev_levels_bytes_per_weight']:.3f}", f"{r['rate_scalar_bytes_per_tensor']:.1f}"]
       for r in rows])
  out = H.results_path("state_bytes", args.quick, args.out)
  H.write_json(out, dict(meta=H.meta(sys.argv[1:] if argv is None else argv,
                                     seconds=time.perf_counter() - t0), rows=rows))
  return rows


if __name__ == "__main__":
  main()
