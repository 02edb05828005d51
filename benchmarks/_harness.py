"""Shared pieces of the TALR benchmarks: tensors, optimizers, interleaved timing, JSON.

Not a benchmark itself. Every script that times TALR (``optimizer_step``,
``train_step``, ``remedies_step``; ``scaling`` reads ``optimizer_step``'s file)
measures its two sides (plain Optax and TALR) in the same process, interleaved: after compilation and
warm-up, each *round* calls every variant once, in an order shuffled per round,
and each call ends with ``jax.block_until_ready``. The reported numbers are the
median and interquartile range (IQR) of the rounds, the ratio of medians
against the plain baseline of the same rounds, and the IQR of the per-round
ratios (variant time / baseline time in the same round), which cancels part of
the noise of a shared machine. Minor page faults per call come from
``resource.getrusage`` (``ru_minflt``). ``state_bytes`` and ``recompiles`` count
bytes and compilations; the studies (``qat_study``, ``sampling_fidelity``,
``ema_momentum``) compare training results, not times. They use the JSON and
machine-record helpers here.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import talr_optax as talr

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

BITS = 2
LR = 0.1  # SGD learning rate (TALR's base rate U_0)
ADAM_LR = 1e-3
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
# A target that keeps U moving every step (it is not a convergence study).
TARGET = 1e-2
# Weights counted per rate group by the sampled variants (``sample_size=``).
SAMPLE_SIZE = 65536

# Conv-shaped (HWIO) weight tensors: 10 tensors per size. "0.1M" is only for
# smoke tests (its tensors have fewer than SAMPLE_SIZE weights: never sampled).
SIZES: dict[str, list[tuple[int, ...]]] = {
    "0.1M": [(3, 3, 32, 36)] * 10,        # 0.10M
    "1M": [(3, 3, 64, 176)] * 10,         # 1.01M
    "10M": [(3, 3, 256, 448)] * 10,       # 10.3M
    "50M": [(3, 3, 512, 1120)] * 10,      # 51.6M
}


def n_weights(size: str) -> int:
  return int(sum(np.prod(s) for s in SIZES[size]))


# ---------------------------------------------------------------------------
# Tensors and optimizers.


def make_problem(size: str, seed: int = 0):
  """Params, gradients (1 % of the weight std) and per-tensor step sizes."""
  key = jax.random.PRNGKey(seed)
  params, grads = {}, {}
  for i, shape in enumerate(SIZES[size]):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    params[f"conv{i:02d}"] = 0.05 * jax.random.normal(k1, shape, jnp.float32)
    grads[f"conv{i:02d}"] = 5e-4 * jax.random.normal(k2, shape, jnp.float32)
  scales = {k: float(talr.initial_weight_scale(v)) for k, v in params.items()}
  return params, grads, scales


def optimizers(levels_fn: Callable[[Any], Any], sample_size: int = SAMPLE_SIZE
               ) -> dict[str, optax.GradientTransformation]:
  """The plain optimizers and their TALR counterparts, same hyperparameters.

  ``sgd`` is ``chain(add_decayed_weights, trace, scale_by_learning_rate)``,
  ``sgdt`` the same chain with ``scale_by_talr`` as the last stage
  (``talr_optax.sgdt``); likewise ``adam`` / ``adamt`` with ``scale_by_adam``.
  ``*_sampled`` count the transitions on at most ``sample_size`` weights per
  quantized tensor (exact: every weight).
  """
  sgdt = lambda **kw: talr.sgdt(LR, TARGET, levels_fn, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY, **kw)
  adamt = lambda **kw: talr.adamt(ADAM_LR, TARGET, levels_fn, weight_decay=WEIGHT_DECAY, **kw)
  return {
      "sgd": optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.trace(MOMENTUM),
                         optax.scale_by_learning_rate(LR)),
      "sgdt": sgdt(),
      "sgdt_sampled": sgdt(sample_size=sample_size),
      "adam": optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.scale_by_adam(),
                          optax.scale_by_learning_rate(ADAM_LR)),
      "adamt": adamt(),
      "adamt_sampled": adamt(sample_size=sample_size),
  }


def tree_nbytes(tree: Any) -> int:
  """Exact bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
  return int(sum(
      int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


# ---------------------------------------------------------------------------
# Timing.


def minflt() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def jitted_step(tx: Any, donate: bool) -> Callable[..., Any]:
  """``jax.jit`` of one ``(params, state, grads) -> (params, state)`` step of ``tx``."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def copy_tree(tree: Any) -> Any:
  """Fresh buffers (a donated step consumes its inputs)."""
  return jax.tree.map(lambda x: x.copy(), tree)


def stepper(fn: Callable[..., Any], params: Any, state: Any, grads: Any, warmup: int
            ) -> Callable[[], None]:
  """A runner for :func:`time_interleaved`: one ``fn(params, state, grads)`` step.

  The step's outputs replace its inputs (what a loop with donated buffers
  does); it is called ``1 + warmup`` times here, to compile and warm up.
  """
  holder = {"p": params, "s": state}

  def call():
    holder["p"], holder["s"] = fn(holder["p"], holder["s"], grads)
    jax.block_until_ready((holder["p"], holder["s"]))

  for _ in range(1 + warmup):
    call()
  return call


def time_interleaved(runners: dict[str, Callable[[], Any]], repeats: int, seed: int = 0
                     ) -> dict[str, dict[str, list[float]]]:
  """Calls every runner once per round (order shuffled per round).

  Each runner must do one step and block until its results are ready.
  Returns per runner the wall times (s) and minor page faults of each round.
  """
  out = {k: {"t": [], "faults": []} for k in runners}
  order = list(runners)
  rng = random.Random(seed)
  for _ in range(repeats):
    rng.shuffle(order)
    for k in order:
      f0 = minflt()
      t0 = time.perf_counter()
      runners[k]()
      dt = time.perf_counter() - t0
      out[k]["t"].append(dt)
      out[k]["faults"].append(minflt() - f0)
  return out


def summarize(raw: dict[str, dict[str, list[float]]], baselines: dict[str, str]
              ) -> dict[str, dict[str, float]]:
  """Median / IQR per runner; ratio of medians and IQR of paired per-round ratios.

  ``baselines`` maps a runner to the runner it is compared with (itself for
  the baselines).
  """
  stats = {}
  for k, v in raw.items():
    t = np.asarray(v["t"]) * 1e3
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    base = baselines.get(k, k)
    tb = np.asarray(raw[base]["t"]) * 1e3
    paired = t / tb
    p1, pmed, p3 = np.percentile(paired, [25, 50, 75])
    stats[k] = dict(
        baseline=base, median_ms=float(med), q1_ms=float(q1), q3_ms=float(q3),
        iqr_ms=float(q3 - q1), ratio=float(med / np.median(tb)),
        ratio_paired_median=float(pmed), ratio_q1=float(p1), ratio_q3=float(p3),
        ratio_iqr=float(p3 - p1), minflt_median=int(np.median(v["faults"])),
        repeats=len(t))
  return stats


# ---------------------------------------------------------------------------
# Compile counting.

_COMPILES = {"backend": 0, "trace": 0}


def _listener(event: str, duration: float, **kwargs) -> None:
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES["backend"] += 1
  elif event == "/jax/core/compile/jaxpr_trace_duration":
    _COMPILES["trace"] += 1


_REGISTERED = False


def compile_counts() -> dict[str, int]:
  """Process-wide counts of XLA compilations and jaxpr traces so far."""
  global _REGISTERED
  if not _REGISTERED:
    jax.monitoring.register_event_duration_secs_listener(_listener)
    _REGISTERED = True
  return dict(_COMPILES)


# ---------------------------------------------------------------------------
# Reporting.


def loadavg() -> list[float] | None:
  try:
    with open("/proc/loadavg") as f:
      return [float(x) for x in f.read().split()[:3]]
  except OSError:
    return None


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


# The instruction-set extensions that decide which matrix-product kernels run.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def cpu_isa() -> list[str]:
  """The CPU's extensions among those oneDNN picks its kernels by (docs/reproducibility.md)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return []
  return [name for name in _ISA_FLAGS if name in flags]


def meta(argv: Sequence[str], **extra) -> dict[str, Any]:
  import jaxlib  # pylint: disable=import-outside-toplevel
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(RESULTS_DIR), timeout=5).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    commit = None
  return dict(
      jax=jax.__version__, jaxlib=jaxlib.__version__, optax=optax.__version__,
      backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
      cpu_count=os.cpu_count(), cpu_model=cpu_model(), platform=platform.platform(),
      python=platform.python_version(), xla_flags=os.environ.get("XLA_FLAGS", ""),
      glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""), git_head=commit,
      argv=list(argv), **extra)


def results_path(name: str, quick: bool, out: str | None = None) -> str:
  """``out``, or ``results/<name>.json`` (``<name>_quick.json`` for quick runs)."""
  return out or os.path.join(RESULTS_DIR, f"{name}_quick.json" if quick else f"{name}.json")


def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
  print(f"wrote {path}")


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
  rows = [[_fmt(x) for x in r] for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)]
  print(f"\n== {title}")
  print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths))))
  for r in rows:
    print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))))
  sys.stdout.flush()


def _fmt(x: Any) -> str:
  if isinstance(x, float):
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
  return str(x)


def ratio_cell(s: dict[str, float]) -> str:
  """``ratio [q1-q3]``: ratio of medians and IQR of the paired per-round ratios."""
  return f"{s['ratio']:.3f} [{s['ratio_q1']:.2f}-{s['ratio_q3']:.2f}]"


# ---------------------------------------------------------------------------
# HLO traffic model.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_CACHE_LINE = 64
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)")
_SKIP = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def _parse_shape(text: str) -> tuple[str, int, tuple[int, ...]] | None:
  m = re.match(r"(\w+)\[([\d,]*)\]", text)
  if not m or m.group(1) not in _DTYPE_BYTES:
    return None
  dims = tuple(int(d) for d in m.group(2).split(",") if d)
  return m.group(1), int(np.prod(dims)) if dims else 1, dims


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  """Body lines of every computation of an HLO module, and the ENTRY's name."""
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
    if m and line.rstrip().endswith("{"):
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entry = current
    elif line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line)
  return comps, entry


def _strided_fraction(body: list[str], n_in: int, itemsize: int) -> float:
  """Fraction of a fused operand's cache lines a strided ``slice`` inside the fusion reads.

  1.0 when the fusion has no strided slice of an array of ``n_in`` elements.
  The sampled count (``sample_size``) slices the levels on a grid: a row
  along the last axis is read whole if its stride is under a cache line,
  and rows skipped by the strides of the other axes are not read.
  """
  shapes = {}
  for line in body:
    m = _INSTR.match(line)
    if not m:
      continue
    shp = _parse_shape(m.group(2))
    if shp:
      shapes[m.group(1)] = shp
    if m.group(3) != "slice":
      continue
    src = re.match(r"%([\w.\-]+)", m.group(4))
    spec = re.search(r"slice=\{(.*?)\}", line)
    if not src or not spec or src.group(1) not in shapes or shapes[src.group(1)][1] != n_in:
      continue
    strides = [int(x.split(":")[2]) if x.count(":") == 2 else 1
               for x in re.findall(r"\[([\d:]+)\]", spec.group(1))]
    if not strides or all(st == 1 for st in strides):
      continue
    frac = 1.0 / float(np.prod(strides[:-1]))
    return frac * min(1.0, _CACHE_LINE / (strides[-1] * itemsize))
  return 1.0


def hlo_passes(hlo_text: str, min_elems: int) -> list[dict[str, Any]]:
  """Top-level ops of the ENTRY computation that touch large arrays.

  For every instruction of the compiled ENTRY computation (fusions, copies,
  custom calls ...) whose output or operands have at least ``min_elems``
  elements, returns its name, opcode, fusion kind, *role*, and the bytes of
  those large operands and outputs: what that op reads from and writes to
  memory once (an operand a fusion reads twice is counted once; an operand a
  fusion reads through a strided slice counts the cache lines it touches).
  Their sum divided by the number of weights is the memory traffic per weight
  of one step, as compiled.

  Roles: ``update`` writes a large float array (new params or moments),
  ``levels`` writes large integer levels from floats, ``count`` reduces
  integer levels to a small result, ``copy`` copies a large array (around
  donated, aliased buffers), ``other`` anything else. ``waits_for_count`` is
  True for an op that depends, directly or not, on a ``count`` op of the
  same step.
  """
  comps, entry = _computations(hlo_text)
  if entry is None:
    return []
  shapes: dict[str, tuple[str, int, tuple[int, ...]]] = {}
  deps: dict[str, list[str]] = {}
  ops = []
  for line in comps[entry]:
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape_text, opcode, rest = m.groups()
    shp = _parse_shape(shape_text)
    if shp:
      shapes[name] = shp
    operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    deps[name] = operands
    if opcode in _SKIP:
      continue
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = comps.get(called.group(1), []) if called else []
    read, large_in = 0.0, []
    for o in set(operands):
      if o in shapes and shapes[o][1] >= min_elems:
        item = _DTYPE_BYTES[shapes[o][0]]
        read += item * shapes[o][1] * _strided_fraction(body, shapes[o][1], item)
        large_in.append(shapes[o][0])
    write = (_DTYPE_BYTES[shp[0]] * shp[1]) if shp and shp[1] >= min_elems else 0
    if not (read or write):
      continue
    out_dtype = shp[0] if shp else None
    if opcode == "copy":
      role = "copy"
    elif write and out_dtype and out_dtype.startswith(("f", "bf")):
      role = "update"
    elif write and out_dtype and out_dtype.startswith(("s", "u")):
      role = "levels"
    elif not write and any(d.startswith(("s", "u", "pred")) for d in large_in):
      role = "count"
    else:
      role = "other"
    kind = re.search(r"kind=(\w+)", line)
    ops.append(dict(name=name, op=opcode, kind=kind.group(1) if kind else "", role=role,
                    read_bytes=int(round(read)), write_bytes=int(write),
                    out_dtype=out_dtype))
  counts = {o["name"] for o in ops if o["role"] == "count"}
  memo: dict[str, bool] = {}

  def waits(name: str) -> bool:
    if name not in memo:
      memo[name] = False  # cycles cannot happen; guards the recursion
      memo[name] = any(o in counts or waits(o) for o in deps.get(name, ()))
    return memo[name]

  for o in ops:
    o["waits_for_count"] = waits(o["name"])
  return ops


def hlo_min_elems(n: int, n_tensors: int) -> int:
  """Smallest array the traffic model counts: 1/256 of a tensor (sampled levels are larger)."""
  return max(1024, n // (256 * n_tensors))


def hlo_summary(hlo_text: str, n: int, n_tensors: int) -> dict[str, Any]:
  """Bytes per weight read + written by the compiled step, per role; full-size ops per tensor.

  ``update_waits_for_count``: some op writing new params or moments depends
  on a transition count of the same step (TALR's update must not).
  """
  ops = hlo_passes(hlo_text, min_elems=hlo_min_elems(n, n_tensors))
  total = sum(o["read_bytes"] + o["write_bytes"] for o in ops)
  kinds: dict[str, int] = {}
  roles: dict[str, float] = {}
  for o in ops:
    key = o["op"] if o["op"] != "fusion" else f"fusion:{o['kind']}"
    kinds[key] = kinds.get(key, 0) + 1
    roles[o["role"]] = roles.get(o["role"], 0.0) + (o["read_bytes"] + o["write_bytes"]) / n
  return dict(bytes_per_weight=total / n, ops_per_tensor=len(ops) / n_tensors,
              op_kinds={k: v / n_tensors for k, v in sorted(kinds.items())},
              bytes_per_weight_by_role={k: v for k, v in sorted(roles.items())},
              update_waits_for_count=any(
                  o["waits_for_count"] for o in ops if o["role"] == "update"))
