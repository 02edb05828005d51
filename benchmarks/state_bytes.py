"""Figure 3, the memory bill: optimizer-state bytes of TALR next to plain Optax.

Every state is sized without allocating it: ``jax.eval_shape(tx.init, params)``
over ``jax.ShapeDtypeStruct`` params gives the shape and dtype of every state
leaf, and the bytes are summed exactly (``size x itemsize``). Reported per
setting and optimizer: the total state bytes, bytes per weight, the bytes
over the plain optimizer (``extra``) per quantized weight, and TALR's parts:
the int8 previous levels (``prev_levels``: 1 B per counted weight) and the
rate vectors (``k, K, R, U, c``: 5 float32 per rate group) plus the int32
step count.

Settings:

* ``conv``: the ten conv tensors of ``optimizer_step.py`` at each size (all
  quantized), SGD / SGDT / SGDT sampled and Adam / AdamT / AdamT sampled;
* ``resnet20``: the NNX ResNet-20 W2A2 optimizer of ``train_step.py`` (the
  whole four-group ``optax.partition``; built for real, it is small),
  SGD / SGDT / SGD + ``track_transitions``;
* ``llama7b``: a Llama-2-7B-shaped param tree (vocab 32000, d_model 4096, 32
  layers, 32 heads of 128, MLP 11008, RMSNorm scales; 6.74B params): every
  attention (q, k, v, o) and MLP (gate, up, down) kernel quantized (6.48B
  weights, 224 tensors), embeddings, norms and lm_head full precision (their
  TALR update is ``fallback_learning_rate``). Unstacked (one param per layer)
  and stacked (params of shape ``(32, ...)``, ``layer_axes=0`` for the
  quantized ones: 224 rate groups either way), float32 and bfloat16 params.
  Adam vs AdamT exact vs AdamT ``sample_size=65536``. Nothing of the 27 GB
  of float32 params is allocated: the peak RSS of the process is recorded
  before and after.

Usage:
  python benchmarks/state_bytes.py --quick   # 1M conv, ResNet-20, Llama-7B
  python benchmarks/state_bytes.py           # 1M, 10M, 50M conv, ResNet-20, Llama-7B
  python benchmarks/state_bytes.py --settings llama7b
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # pylint: disable=wrong-import-position

import talr_optax as talr  # pylint: disable=wrong-import-position

# (baseline, variant) pairs per setting.
CONV_PAIRS = (("sgd", "sgdt"), ("sgd", "sgdt_sampled"),
              ("adam", "adamt"), ("adam", "adamt_sampled"))
RESNET_PAIRS = (("sgd", "sgdt"), ("sgd", "sgd_track"))
LLAMA_VARIANTS = ("adam", "adamt", "adamt_sampled")

# Llama-2-7B (Touvron et al., 2023).
LLAMA_7B = dict(vocab=32000, d_model=4096, n_layers=32, n_heads=32, d_mlp=11008)
QUANTIZED_BLOCKS = ("attention", "mlp")


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far (MB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def talr_parts(state: Any) -> dict[str, int]:
  """Bytes of TALR's state fields found anywhere in a (nested) optimizer state."""
  kinds = (talr.ScaleByTALRState, talr.TrackTransitionsState)
  parts = {"prev_levels": 0, "rates": 0, "count": 0, "rate_groups": 0}
  for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds)):
    if not isinstance(s, kinds):
      continue
    parts["prev_levels"] += H.tree_nbytes(s.prev_levels)
    # Every rate vector the state declares (talr_optax.ScaleByTALRState.state_fields).
    parts["rates"] += sum(H.tree_nbytes(getattr(s, f)) for f in s.state_fields.per_rate)
    parts["count"] += H.tree_nbytes(getattr(s, "talr_count", None))
    parts["rate_groups"] += len(s.rate_names.names)
  return parts


def row(setting: str, baseline: str, variant: str, n_params: int, n_quantized: int,
        n_tensors: int, base_state: Any, state: Any, **extra) -> dict[str, Any]:
  base_bytes, total = H.tree_nbytes(base_state), H.tree_nbytes(state)
  parts = talr_parts(state)
  out = dict(setting=setting, baseline=baseline, variant=variant, n_params=n_params,
             n_quantized=n_quantized, n_quantized_tensors=n_tensors,
             baseline_bytes=base_bytes, state_bytes=total,
             state_bytes_per_weight=total / n_params,
             extra_bytes=total - base_bytes,
             extra_bytes_per_quantized_weight=(total - base_bytes) / n_quantized,
             prev_levels_bytes=parts["prev_levels"], rate_vector_bytes=parts["rates"],
             count_bytes=parts["count"], rate_groups=parts["rate_groups"],
             other_extra_bytes=total - base_bytes - sum(
                 parts[k] for k in ("prev_levels", "rates", "count")),
             packed_2bit_levels_bytes=-(-n_quantized // 4))
  out.update(extra)
  return out


# ---------------------------------------------------------------------------
# Settings.


def conv_rows(size: str) -> list[dict]:
  shapes = H.SIZES[size]
  params = {f"conv{i:02d}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}
  txs = H.optimizers(talr.levels_fn_from_scales({k: 0.1 for k in params}, bits=H.BITS))
  n = H.n_weights(size)
  states = {v: jax.eval_shape(txs[v].init, params) for pair in CONV_PAIRS for v in pair}
  return [row(f"conv {size}", b, v, n, n, len(shapes), states[b], states[v])
          for b, v in CONV_PAIRS]


def resnet_rows() -> list[dict]:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import train_step as TS  # pylint: disable=import-outside-toplevel
  states, info = {}, {}
  for v in {v for pair in RESNET_PAIRS for v in pair}:
    model = TS.make_model("resnet20", 0)
    opt = nnx.Optimizer(model, TS.make_tx(v, model), wrt=nnx.Param)
    states[v], info = opt.opt_state, TS.model_info(model, opt)
  return [row("resnet20 W2A2 (whole partition)", b, v, info["n_params"], info["n_quantized"],
              info["n_quantized_tensors"], states[b], states[v]) for b, v in RESNET_PAIRS]


def _is_quantized(path) -> bool:
  keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
  return keys[-1] == "kernel" and any(b in keys for b in QUANTIZED_BLOCKS)


def llama_params(stacked: bool, dtype=jnp.float32, cfg=LLAMA_7B, n_layers=None) -> Any:
  """Abstract Llama param tree (``ShapeDtypeStruct`` leaves); kernels are (in, ..., out)."""
  d, f, h, v = cfg["d_model"], cfg["d_mlp"], cfg["n_heads"], cfg["vocab"]
  layers = cfg["n_layers"] if n_layers is None else n_layers
  hd = d // h
  lead = (layers,) if stacked else ()
  s = lambda *shape: jax.ShapeDtypeStruct(lead + shape, dtype)

  def block():
    return {
        "attention_norm": {"scale": s(d)},
        "attention": {"q": {"kernel": s(d, h, hd)}, "k": {"kernel": s(d, h, hd)},
                      "v": {"kernel": s(d, h, hd)}, "o": {"kernel": s(h, hd, d)}},
        "mlp_norm": {"scale": s(d)},
        "mlp": {"gate": {"kernel": s(d, f)}, "up": {"kernel": s(d, f)},
                "down": {"kernel": s(f, d)}},
    }

  top = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  return {
      "embed": {"embedding": top(v, d)},
      "layers": block() if stacked else {str(i): block() for i in range(layers)},
      "final_norm": {"scale": top(d)},
      "lm_head": {"kernel": top(d, v)},
  }


def llama_levels_fn(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: talr.weight_levels(x, 1.0, H.BITS) if _is_quantized(path) else None,
      params)


def llama_layer_axes(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: 0 if _is_quantized(path) else None, params)


def llama_optimizers(stacked: bool, sample_size: int = H.SAMPLE_SIZE) -> dict[str, Any]:
  axes = llama_layer_axes if stacked else None
  adamt = lambda **kw: talr.adamt(H.ADAM_LR, H.TARGET, llama_levels_fn, layer_axes=axes, **kw)
  return {"adam": optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(H.ADAM_LR)),
          "adamt": adamt(), "adamt_sampled": adamt(sample_size=sample_size)}


def llama_rows(n_layers=None) -> list[dict]:
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    for stacked in (False, True):
      params = llama_params(stacked, dtype, n_layers=n_layers)
      leaves = jax.tree_util.tree_leaves_with_path(params)
      n = sum(int(np.prod(x.shape)) for _, x in leaves)
      quantized = [x for p, x in leaves if _is_quantized(p)]
      nq = sum(int(np.prod(x.shape)) for x in quantized)
      layers = LLAMA_7B["n_layers"] if n_layers is None else n_layers
      groups = len(quantized) * (layers if stacked else 1)
      txs = llama_optimizers(stacked)
      states = {v: jax.eval_shape(txs[v].init, params) for v in LLAMA_VARIANTS}
      name = (f"llama7b{'' if n_layers is None else f' ({n_layers} layers)'}"
              f" {'stacked' if stacked else 'unstacked'} {jnp.dtype(dtype).name}")
      for v in LLAMA_VARIANTS:
        rows.append(row(name, "adam", v, n, nq, groups, states["adam"], states[v],
                        stacked=stacked, dtype=jnp.dtype(dtype).name,
                        sample_size=H.SAMPLE_SIZE if v.endswith("sampled") else None))
  return rows


# ---------------------------------------------------------------------------


def _gb(x: float) -> str:
  return f"{x / 1e9:.3f} GB" if x >= 1e8 else f"{x / 1e6:.3f} MB" if x >= 1e5 else f"{int(x)} B"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="1M conv tensors, ResNet-20, Llama-7B")
  ap.add_argument("--settings", default="conv,resnet20,llama7b",
                  help="comma list of conv, resnet20, llama7b")
  ap.add_argument("--sizes", default=None, help="conv sizes, comma list of " + ",".join(H.SIZES))
  ap.add_argument("--llama-layers", type=int, default=None,
                  help="fewer Llama layers (smoke tests); default 32")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  settings = args.settings.split(",")
  sizes = (args.sizes or ("1M" if args.quick else "1M,10M,50M")).split(",")
  t0 = time.perf_counter()
  rss = {"start_mb": peak_rss_mb()}
  rows = []
  if "llama7b" in settings:  # first, so the RSS high-water mark is its own
    rows += llama_rows(args.llama_layers)
    rss["after_llama_mb"] = peak_rss_mb()
  if "conv" in settings:
    rows += [r for s in sizes for r in conv_rows(s)]
  if "resnet20" in settings:
    rows += resnet_rows()
  rss["end_mb"] = peak_rss_mb()
  H.print_table(
      "optimizer state bytes (exact, from jax.eval_shape; nothing allocated for conv and llama)",
      ["setting", "optimizer", "weights", "quantized", "state", "B/w", "extra over base",
       "extra B/qw", "levels B", "rate vectors B", "groups"],
      [[r["setting"], f"{r['variant']} vs {r['baseline']}", r["n_params"], r["n_quantized"],
        _gb(r["state_bytes"]), f"{r['state_bytes_per_weight']:.4f}", _gb(r["extra_bytes"]),
        f"{r['extra_bytes_per_quantized_weight']:.6f}", r["prev_levels_bytes"],
        r["rate_vector_bytes"] + r["count_bytes"], r["rate_groups"]]
       for r in rows])
  print(f"peak RSS (MB): {rss}")
  out = H.results_path("state_bytes", args.quick, args.out)
  H.write_json(out, dict(meta=H.meta(sys.argv[1:] if argv is None else argv, peak_rss=rss,
                                     seconds=time.perf_counter() - t0), rows=rows))
  return rows


if __name__ == "__main__":
  main()
