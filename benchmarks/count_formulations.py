"""Benchmark: how to count int8 level transitions inside a jitted TALR step.

For each quantized tensor the TALR stage computes the integer levels
``round(clip(gamma * w / s, alpha, beta))`` (int8) of the incoming params,
counts how many differ from the levels stored at the previous step (exact
int32), derives a per-tensor learning rate ``U`` from the count and stores the
new levels. This script times the whole optimizer step

    chain(add_decayed_weights(1e-4), trace(0.9), <lr stage>) + apply_updates

jitted, for the plain stage ``scale_by_learning_rate(0.1)`` and for TALR-like
stages that differ only in how the count is formulated (and, for a few, in the
structure of the stage), and reports the step time relative to plain.

Method: every variant is compiled and warmed up, then all variants are timed
in rounds (one call each per round, order shuffled per round, each call ended
by ``jax.block_until_ready``); medians and IQRs of the rounds; ratio of
medians against plain measured in the same rounds.

Usage:
  python benchmarks/count_formulations.py --quick          # ~10M weights, few variants
  python benchmarks/count_formulations.py                  # 1M, 10M, 50M, all variants
  python benchmarks/count_formulations.py --sizes 10M --repeats 30 --donate both
  python benchmarks/count_formulations.py --isolated       # count functions alone
  python benchmarks/count_formulations.py --hlo talr_packed_rows  # print fusions

The output table has: variant, median ms, IQR ms, ratio vs plain (same donation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

# ---------------------------------------------------------------------------
# Quantizer: 2-bit weights, the paper's uniform quantizer.
# ---------------------------------------------------------------------------

BITS = 2
GAMMA = 2 ** (BITS - 1)
ALPHA = -(2 ** (BITS - 1))
BETA = 2 ** (BITS - 1) - 1
BASE_LR = 0.1


def levels_of(w: jax.Array, s: jax.Array) -> jax.Array:
  return jnp.round(jnp.clip(GAMMA * w / s, ALPHA, BETA)).astype(jnp.int8)


# ---------------------------------------------------------------------------
# Count formulations: (levels int8, prev int8) -> exact int32 scalar.
# ---------------------------------------------------------------------------


def count_sum_i32(a, b):
  """(a) jnp.sum of the mask in int32."""
  return jnp.sum(a != b, dtype=jnp.int32)


def count_nonzero(a, b):
  """(b) jnp.count_nonzero of the mask."""
  return jnp.count_nonzero(a != b).astype(jnp.int32)


def count_sum_f32(a, b):
  """(c) float32 sum of the mask: exact only while the count < 2^24."""
  return jnp.sum(a != b, dtype=jnp.float32).astype(jnp.int32)


def count_rows_f32(a, b):
  """Two-stage along the last axis: per-row float32 sums (exact, row < 2^24), int32 outer."""
  a, b = _atleast_1d(a), _atleast_1d(b)
  return jnp.sum(jnp.sum(a != b, axis=-1, dtype=jnp.float32).astype(jnp.int32), dtype=jnp.int32)


def count_absdiff_rows_f32(a, b):
  """Arithmetic, no predicate: min(|a - b|, 1) in float32, per-row sums, int32 outer."""
  a, b = _atleast_1d(a), _atleast_1d(b)
  d = jnp.minimum(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), 1.0)
  return jnp.sum(jnp.sum(d, axis=-1).astype(jnp.int32), dtype=jnp.int32)


def count_xorfold_rows_f32(a, b):
  """Arithmetic on bytes: fold a ^ b to one bit per byte, float32 per-row sums, int32 outer."""
  a, b = _atleast_1d(a), _atleast_1d(b)
  z = lax.bitcast_convert_type(a, jnp.uint8) ^ lax.bitcast_convert_type(b, jnp.uint8)
  z = z | (z >> 4)
  z = z | (z >> 2)
  z = z | (z >> 1)
  z = z & jnp.uint8(1)
  return jnp.sum(jnp.sum(z, axis=-1, dtype=jnp.float32).astype(jnp.int32), dtype=jnp.int32)


def count_flat1024(a, b):
  """(e) Flatten, pad to a multiple of 1024, reshape (-1, 1024); inner f32, outer int32."""
  m = (a != b).reshape(-1)
  pad = (-m.size) % 1024
  m = jnp.pad(m, (0, pad))
  inner = jnp.sum(m.reshape(-1, 1024), axis=1, dtype=jnp.float32)
  return jnp.sum(inner.astype(jnp.int32), dtype=jnp.int32)


def count_lax_reduce_f32(a, b):
  """(f) lax.reduce with a float32 accumulator over the f32 mask (exact < 2^24)."""
  m = (a != b).astype(jnp.float32)
  r = lax.reduce(m, jnp.float32(0), lax.add, tuple(range(m.ndim)))
  return r.astype(jnp.int32)


def _atleast_1d(x):
  return x.reshape(1) if x.ndim == 0 else x


def _words(x: jax.Array) -> jax.Array:
  """(..., C) int8 with C % 4 == 0 -> (..., C // 4) uint32 (reshape of the last axis only)."""
  return lax.bitcast_convert_type(x.reshape(x.shape[:-1] + (x.shape[-1] // 4, 4)), jnp.uint32)


def _changed_bytes(a, b):
  """uint32 words with bit 0 of each byte set iff that byte (level) changed."""
  z = _words(a) ^ _words(b)
  z = z | (z >> 4)
  z = z | (z >> 2)
  z = z | (z >> 1)
  return z & jnp.uint32(0x01010101)


def _packable(a):
  return a.ndim >= 1 and a.shape[-1] % 4 == 0


def count_packed_mul(a, b):
  """(d) packed words, per-word count by multiply 0x01010101 >> 24, int32 sum."""
  if not _packable(a):
    return count_xorfold_rows_f32(a, b)
  c = (_changed_bytes(a, b) * jnp.uint32(0x01010101)) >> 24
  return jnp.sum(c.astype(jnp.int32), dtype=jnp.int32)


def count_packed_pop(a, b):
  """(d) packed words, lax.population_count per word, int32 sum."""
  if not _packable(a):
    return count_xorfold_rows_f32(a, b)
  return jnp.sum(lax.population_count(_changed_bytes(a, b)).astype(jnp.int32), dtype=jnp.int32)


def count_packed_u32(a, b):
  """(d) packed words, multiply-popcount, uint32 sum."""
  if not _packable(a):
    return count_xorfold_rows_f32(a, b)
  c = (_changed_bytes(a, b) * jnp.uint32(0x01010101)) >> 24
  return jnp.sum(c, dtype=jnp.uint32).astype(jnp.int32)


def count_packed_rows(a, b):
  """(d)+(e) packed words, multiply-popcount, per-row float32 sums, int32 outer."""
  if not _packable(a):
    return count_xorfold_rows_f32(a, b)
  c = (_changed_bytes(a, b) * jnp.uint32(0x01010101)) >> 24
  return jnp.sum(jnp.sum(c, axis=-1, dtype=jnp.float32).astype(jnp.int32), dtype=jnp.int32)


def count_packed_pop_rows(a, b):
  """(d)+(e) packed words, population_count, per-row float32 sums, int32 outer."""
  if not _packable(a):
    return count_xorfold_rows_f32(a, b)
  c = lax.population_count(_changed_bytes(a, b))
  return jnp.sum(jnp.sum(c, axis=-1, dtype=jnp.float32).astype(jnp.int32), dtype=jnp.int32)


def _grouped_rows(m, g):
  """Float32 0/1 mask -> exact int32 total: sum groups of g in-fusion, rows in f32, int32 outer."""
  m = _atleast_1d(m)
  if g > 1 and m.shape[-1] % g == 0:
    m = jnp.sum(m.reshape(m.shape[:-1] + (m.shape[-1] // g, g)), axis=-1)
  return jnp.sum(jnp.sum(m, axis=-1).astype(jnp.int32), dtype=jnp.int32)


def count_absdiff_g4(a, b):
  """min(|a - b|, 1) in float32, groups of 4 summed in the elementwise fusion, then rows."""
  a, b = _atleast_1d(a), _atleast_1d(b)
  return _grouped_rows(jnp.minimum(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), 1.0), 4)


def count_absdiff_g16(a, b):
  a, b = _atleast_1d(a), _atleast_1d(b)
  return _grouped_rows(jnp.minimum(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), 1.0), 16)


def count_mask_g4(a, b):
  """(a != b) as float32, groups of 4 in-fusion, then rows."""
  a, b = _atleast_1d(a), _atleast_1d(b)
  return _grouped_rows((a != b).astype(jnp.float32), 4)


def count_sign_rows(a, b):
  """sign(|a - b|) in float32 (no predicate, no broadcast constant), per-row sums, int32 outer."""
  a, b = _atleast_1d(a), _atleast_1d(b)
  d = jnp.sign(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
  return jnp.sum(jnp.sum(d, axis=-1).astype(jnp.int32), dtype=jnp.int32)


def count_sign_g4(a, b):
  a, b = _atleast_1d(a), _atleast_1d(b)
  return _grouped_rows(jnp.sign(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))), 4)


COUNTS: dict[str, Callable] = {
    "sign_rows": count_sign_rows,
    "sign_g4": count_sign_g4,
    "absdiff_g4": count_absdiff_g4,
    "absdiff_g16": count_absdiff_g16,
    "mask_g4": count_mask_g4,
    "sum_i32": count_sum_i32,
    "count_nonzero": count_nonzero,
    "sum_f32": count_sum_f32,
    "rows_f32": count_rows_f32,
    "absdiff_rows_f32": count_absdiff_rows_f32,
    "xorfold_rows_f32": count_xorfold_rows_f32,
    "flat1024": count_flat1024,
    "lax_reduce_f32": count_lax_reduce_f32,
    "packed_mul": count_packed_mul,
    "packed_pop": count_packed_pop,
    "packed_u32": count_packed_u32,
    "packed_rows": count_packed_rows,
    "packed_pop_rows": count_packed_pop_rows,
}

# Exact for every count up to 2^31 - 1 (sum_f32 / lax_reduce_f32 only below 2^24 per tensor).
EXACT = {k: k not in ("sum_f32", "lax_reduce_f32") for k in COUNTS}

# ---------------------------------------------------------------------------
# LR stages.
# ---------------------------------------------------------------------------


class TalrState(NamedTuple):
  prev: object   # int8 levels per tensor
  scale: object  # float32 scalar step size per tensor
  count: object  # int32 scalar per tensor (last count, kept for inspection)


def _u_of(count, size):
  return BASE_LR * (1.0 + 1e-3 * count.astype(jnp.float32) / size)


def talr_stage(count_fn: Callable | None, barrier: bool = False) -> optax.GradientTransformation:
  """Levels of the incoming params vs stored levels; updates * -U(count); store levels."""

  def init(params):
    scale = jax.tree.map(lambda p: 3.0 * jnp.std(p), params)
    prev = jax.tree.map(levels_of, params, scale)
    count = jax.tree.map(lambda p: jnp.zeros((), jnp.int32), params)
    return TalrState(prev, scale, count)

  def update(updates, state, params):
    levels = jax.tree.map(levels_of, params, state.scale)
    if barrier:
      levels = lax.optimization_barrier(levels)
    if count_fn is None:
      counts = jax.tree.map(lambda p: jnp.zeros((), jnp.int32), params)
      us = jax.tree.map(lambda p: jnp.float32(BASE_LR), params)
    else:
      counts = jax.tree.map(count_fn, levels, state.prev)
      us = jax.tree.map(lambda c, p: _u_of(c, p.size), counts, params)
    updates = jax.tree.map(lambda g, u: (-u * g).astype(g.dtype), updates, us)
    return updates, TalrState(levels, state.scale, counts)

  return optax.GradientTransformation(init, update)


class LookaheadState(NamedTuple):
  scale: object
  count: object  # transitions that the previous update caused (int32)


def talr_lookahead_stage(count_fn: Callable) -> optax.GradientTransformation:
  """Structure variant: no stored levels. Uses the count stored at the previous step
  (levels of params_{t-1} vs params_{t-1} + updates_{t-1}) for U_t, and counts the
  transitions that this step's updates will cause, in the same pass as the update.
  Same numbers as the reference only if the caller applies the updates unchanged
  (params_t == params_{t-1} + updates_{t-1}, bit for bit)."""

  def init(params):
    scale = jax.tree.map(lambda p: 3.0 * jnp.std(p), params)
    count = jax.tree.map(lambda p: jnp.zeros((), jnp.int32), params)
    return LookaheadState(scale, count)

  def update(updates, state, params):
    us = jax.tree.map(lambda c, p: _u_of(c, p.size), state.count, params)
    updates = jax.tree.map(lambda g, u: (-u * g).astype(g.dtype), updates, us)
    new_params = optax.apply_updates(params, updates)
    counts = jax.tree.map(
        lambda p, q, s: count_fn(levels_of(p, s), levels_of(q, s)),
        params, new_params, state.scale)
    return updates, LookaheadState(state.scale, counts)

  return optax.GradientTransformation(init, update)


def variants(quick: bool) -> dict[str, optax.GradientTransformation]:
  v = {"plain": optax.scale_by_learning_rate(BASE_LR), "talr_nocount": talr_stage(None)}
  names = (["sum_i32", "sum_f32", "packed_mul", "packed_rows", "absdiff_rows_f32", "sign_rows"]
           if quick else list(COUNTS))
  for k in names:
    v[f"talr_{k}"] = talr_stage(COUNTS[k])
  for k in (["packed_rows"] if quick else ["sum_i32", "rows_f32", "packed_mul", "packed_rows"]):
    v[f"talr_{k}_barrier"] = talr_stage(COUNTS[k], barrier=True)
  for k in (["packed_rows"] if quick else ["packed_rows", "absdiff_rows_f32", "absdiff_g4", "absdiff_g16"]):
    v[f"lookahead_{k}"] = talr_lookahead_stage(COUNTS[k])
  return v


# ---------------------------------------------------------------------------
# Harness.
# ---------------------------------------------------------------------------

SIZES = {  # name -> list of tensor shapes (HWIO conv kernels)
    "1M": [(3, 3, 64, 176)] * 10,          # 1.01M
    "10M": [(3, 3, 256, 448)] * 10,        # 10.3M
    "50M": [(3, 3, 512, 1120)] * 10,       # 51.6M
}


def make_params(shapes, seed=0):
  key = jax.random.PRNGKey(seed)
  params, grads = {}, {}
  for i, sh in enumerate(shapes):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    params[f"conv{i}"] = 0.05 * jax.random.normal(k1, sh, jnp.float32)
    grads[f"conv{i}"] = 0.05 * jax.random.normal(k2, sh, jnp.float32)
  return params, grads


def build_step(stage, donate: bool):
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.trace(0.9), stage)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  fn = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  return tx, fn


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def run_steps(sizes, names_filter, repeats, warmup, donate_modes, quick, seed=0):
  rows = []
  for size in sizes:
    shapes = SIZES[size]
    params0, grads = make_params(shapes, seed)
    nweights = sum(int(np.prod(s)) for s in shapes)
    for donate in donate_modes:
      vs = variants(quick)
      if names_filter:
        vs = {k: v for k, v in vs.items() if k == "plain" or k in names_filter}
      runners = {}
      for name, stage in vs.items():
        tx, fn = build_step(stage, donate)
        p = _copy(params0)
        st = tx.init(p)
        holder = {"p": p, "s": st}

        def call(holder=holder, fn=fn):
          holder["p"], holder["s"] = fn(holder["p"], holder["s"], grads)
          jax.block_until_ready((holder["p"], holder["s"]))

        call()  # compile
        for _ in range(warmup):
          call()
        runners[name] = call
      times = {k: [] for k in runners}
      faults = {k: [] for k in runners}
      order = list(runners)
      rng = random.Random(seed)
      for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
          f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
          t0 = time.perf_counter()
          runners[k]()
          times[k].append(time.perf_counter() - t0)
          faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
      plain_med = float(np.median(times["plain"]))
      for k, ts in times.items():
        ts = np.asarray(ts) * 1e3
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        rows.append(dict(size=size, n_weights=nweights, donate=donate, variant=k,
                         median_ms=float(med), iqr_ms=float(q3 - q1),
                         ratio_vs_plain=float(med / (plain_med * 1e3)),
                         page_faults=int(np.median(faults[k])), repeats=len(ts)))
      _print_table([r for r in rows if r["size"] == size and r["donate"] == donate],
                   f"step, {size} weights ({nweights:,}), donate={donate}")
      del runners
  return rows


def run_isolated(sizes, repeats, warmup, seed=0):
  """The count functions alone on the levels of 10 tensors (1 % of levels changed)."""
  rows = []
  for size in sizes:
    shapes = SIZES[size]
    key = jax.random.PRNGKey(seed)
    a = [jax.random.randint(jax.random.fold_in(key, i), sh, -2, 2, dtype=jnp.int8)
         for i, sh in enumerate(shapes)]
    b = [jnp.where(jax.random.uniform(jax.random.fold_in(key, 1000 + i), x.shape) < 0.01,
                   (x + 1) % 2, x).astype(jnp.int8) for i, x in enumerate(a)]
    ref = [int(np.count_nonzero(np.asarray(x) != np.asarray(y))) for x, y in zip(a, b)]
    fns = {k: jax.jit(lambda A, B, f=f: [f(x, y) for x, y in zip(A, B)]) for k, f in COUNTS.items()}
    fns["numpy"] = lambda A, B: [np.count_nonzero(np.asarray(x) != np.asarray(y)) for x, y in zip(A, B)]
    for k, f in fns.items():
      got = [int(c) for c in f(a, b)]
      assert got == ref, (k, got, ref)
      for _ in range(warmup):
        jax.block_until_ready(f(a, b))
    times = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(repeats):
      rng.shuffle(order)
      for k in order:
        t0 = time.perf_counter()
        jax.block_until_ready(fns[k](a, b))
        times[k].append(time.perf_counter() - t0)
    base = float(np.median(times["sum_i32"]))
    sub = []
    for k, ts in times.items():
      ts = np.asarray(ts) * 1e3
      q1, med, q3 = np.percentile(ts, [25, 50, 75])
      sub.append(dict(size=size, n_weights=sum(x.size for x in a), donate=None,
                      variant=f"iso_{k}", median_ms=float(med), iqr_ms=float(q3 - q1),
                      ratio_vs_plain=float(med / (base * 1e3)), repeats=len(ts)))
    _print_table(sub, f"count alone, {size} levels (ratio vs sum_i32)")
    rows += sub
  return rows


def check_correctness():
  """Every exact formulation on odd shapes (incl. last axis not divisible by 4) vs NumPy."""
  rng = np.random.default_rng(0)
  shapes = [(), (1,), (3,), (7,), (4,), (5, 3), (2, 3, 9), (3, 3, 3, 64), (8, 12), (1000, 4),
            (3, 3, 17, 33)]
  for sh in shapes:
    a = rng.integers(-128, 128, size=sh, dtype=np.int8)
    b = np.where(rng.random(sh) < 0.3, rng.integers(-128, 128, size=sh, dtype=np.int8), a).astype(np.int8)
    want = int(np.count_nonzero(a != b))
    for k, f in COUNTS.items():
      got = int(jax.jit(f)(jnp.asarray(a), jnp.asarray(b)))
      assert got == want, (k, sh, got, want)
      got2 = int(jax.jit(f)(jnp.asarray(a), jnp.asarray(a)))
      assert got2 == 0, (k, sh, got2)
  # every byte pattern pair differs in exactly the changed bytes
  a = np.arange(-128, 128, dtype=np.int8).repeat(256)
  b = np.tile(np.arange(-128, 128, dtype=np.int8), 256)
  want = int(np.count_nonzero(a != b))
  for k, f in COUNTS.items():
    assert int(jax.jit(f)(jnp.asarray(a), jnp.asarray(b))) == want, k
  print("correctness: all formulations exact on", len(shapes) + 1, "cases")


def _print_table(rows, title):
  print(f"\n== {title}")
  print(f"{'variant':32s} {'median ms':>10s} {'IQR ms':>8s} {'ratio':>7s} {'faults':>7s}")
  for r in rows:
    print(f"{r['variant']:32s} {r['median_ms']:10.2f} {r['iqr_ms']:8.2f} {r['ratio_vs_plain']:7.3f}"
          f" {r.get('page_faults', -1):7d}")
  sys.stdout.flush()


def print_hlo(name, size):
  stage = variants(False)[name]
  params, grads = make_params(SIZES[size][:1])
  tx, fn = build_step(stage, False)
  st = tx.init(params)
  print(fn.lower(params, st, grads).compile().as_text())


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="10M only, few variants, 20 repeats")
  ap.add_argument("--sizes", default=None, help="comma list of 1M,10M,50M")
  ap.add_argument("--variants", default=None, help="comma list of variant names (plain always kept)")
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--donate", choices=["no", "yes", "both"], default=None)
  ap.add_argument("--isolated", action="store_true", help="also time the count functions alone")
  ap.add_argument("--hlo", default=None, help="print the compiled HLO of one variant and exit")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results", "count_formulations.json"))
  args = ap.parse_args(argv)
  if args.hlo:
    print_hlo(args.hlo, (args.sizes or "1M").split(",")[0])
    return
  check_correctness()
  sizes = (args.sizes or ("10M" if args.quick else "1M,10M,50M")).split(",")
  repeats = args.repeats or (20 if args.quick else 25)
  donate = args.donate or ("no" if args.quick else "both")
  donate_modes = {"no": [False], "yes": [True], "both": [False, True]}[donate]
  filt = set(args.variants.split(",")) if args.variants else None
  rows = []
  if args.isolated:
    rows += run_isolated(sizes, repeats, args.warmup)
  rows += run_steps(sizes, filt, repeats, args.warmup, donate_modes, args.quick)
  meta = dict(jax=jax.__version__, jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
              optax=optax.__version__, backend=jax.default_backend(), cpu_count=os.cpu_count(),
              platform=platform.platform(), xla_flags=os.environ.get("XLA_FLAGS", ""),
              argv=sys.argv[1:], repeats=repeats, warmup=args.warmup)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
