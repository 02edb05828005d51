"""Training for the language-model task: pretraining, one QAT run, evaluation.

One compiled step serves every run of the same kind. The step receives the
model (NNX traces its variables) and builds the optimizer from that traced
model, so the weight step sizes ``levels_fn`` reads are inputs of the
program, not constants baked in per run; the baseline's learning-rate
multiple is an input too. A run of another seed or learning rate then reuses
the program compiled for the first one, which on a CPU saves several seconds
per run.

Who imports whom: :mod:`~talr_optax.demo.lm_runs` imports this module; this
module imports the runner's shared parts (traces, record, progress) from
:mod:`~talr_optax.demo.runner`, which never imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import talr_optax as talr
from talr_optax import nnx as tnnx
from talr_optax.demo import export, lm_data
from talr_optax.demo.config import WEIGHT_DECAY
from talr_optax.demo.lm_config import EVAL_BATCH, VAL_EVERY, LMConfig
from talr_optax.demo.runner import (TRACE_KEYS, Progress, append_traces, md2tp,
                                    quantized_record, step_metrics)

FP = "fp"


class LMData(NamedTuple):
  """What every run of the task reads: the corpus and the fixed validation windows."""

  corpus: lm_data.ByteCorpus
  val: np.ndarray


def load(cfg: LMConfig) -> LMData:
  """The standard library's bytes and ``cfg.eval_windows`` validation windows of ``context + 1``.

  Raises:
    FileNotFoundError, ValueError: no standard library source, or a split
      shorter than one window.
  """
  corpus = lm_data.load_stdlib(val_every=VAL_EVERY, min_bytes=cfg.context + 1)
  return LMData(corpus, lm_data.fixed_windows(corpus.val, cfg.context + 1, cfg.eval_windows))


@dataclasses.dataclass(frozen=True)
class Arm:
  """What a compiled training step depends on (hashable: a static argument).

  Attributes:
    method: ``"fp"`` (pretraining), ``"sgd"`` (the AdamW baseline) or
      ``"talr"`` (AdamWT).
    bits: weight bits (``None`` for pretraining).
    steps: length of the run (the cosine schedules end there).
    lr: base learning rate.
    lam: the target's ``lambda``.
    rule: TALR rule.
    ema_momentum: momentum ``m`` of ``K`` (both arms) and of TALR's ``c``.
    sample_size: weights counted per rate group (``None``: all).
  """

  method: str
  bits: int | None
  steps: int
  lr: float
  lam: float = 5e-3
  rule: str = "multiplicative"
  ema_momentum: float = 0.99
  sample_size: int | None = None

  @property
  def r0(self) -> float:
    """``R_0 = lambda sqrt(bits)`` (0 for pretraining)."""
    return talr.initial_target(self.bits, self.lam) if self.bits else 0.0

  def schedule(self) -> optax.Schedule:
    """Pretraining: warm-up then cosine to a tenth; QAT: cosine from ``lr`` to 0."""
    if self.method == FP:
      warmup = max(1, min(100, self.steps // 10))
      return optax.warmup_cosine_decay_schedule(0.0, self.lr, warmup, self.steps,
                                                end_value=self.lr / 10)
    return optax.cosine_decay_schedule(self.lr, self.steps)

  def target(self) -> optax.Schedule:
    """TALR's cosine target from ``R_0`` (the baseline's ``K`` is compared with it)."""
    return talr.cosine_target(self.r0, self.steps)


def optimizer(arm: Arm, model: nnx.Module, lr_scale: Any = 1.0,
              then: Sequence[optax.GradientTransformation] = ()) -> optax.GradientTransformation:
  """The optimizer of ``arm`` for ``model`` (two parameter groups in QAT).

  Quantized kernels: AdamWT with the cosine target (``method="talr"``), or
  AdamW with ``lr_scale`` times the cosine learning rate (``"sgd"``, whose
  transitions ``track_transitions`` counts); both chains end with
  ``track_oscillations``, a monitor. Everything else (embeddings, norms,
  output layer): AdamW with the cosine learning rate, the same in both arms.
  Per-layer rates for the stacked kernels (``layer_axes_for``).

  Args:
    arm: the run's settings.
    model: the model, possibly traced (inside the compiled step).
    lr_scale: the baseline's multiple of the cosine learning rate (a float
      or a traced scalar); unused by the other methods.
    then: stages appended to the quantized kernels' chain in QAT, after the
      oscillation monitor (e.g. a study's own ``track_transitions``).

  Returns:
    An ``optax`` transformation over ``nnx.state(model, nnx.Param)``.
  """
  lr = arm.schedule()
  full_precision = optax.adamw(lr, weight_decay=WEIGHT_DECAY)
  if arm.method == FP:
    return full_precision
  levels_fn, axes = tnnx.levels_fn_for(model), tnnx.layer_axes_for(model)
  if arm.method == "talr":
    quantized = talr.adamwt(lr, arm.target(), levels_fn, weight_decay=WEIGHT_DECAY,
                            rule=arm.rule, ema_momentum=arm.ema_momentum, layer_axes=axes,
                            sample_size=arm.sample_size)
  else:
    # optax.adamw's stages, then the count; K starts at R_0 as TALR's does.
    quantized = optax.chain(
        optax.scale_by_adam(), optax.add_decayed_weights(WEIGHT_DECAY),
        optax.scale_by_learning_rate(lambda count: lr_scale * lr(count)),
        talr.track_transitions(levels_fn, arm.target(), ema_momentum=arm.ema_momentum,
                               layer_axes=axes, sample_size=arm.sample_size))
  quantized = optax.chain(quantized, talr.track_oscillations(
      levels_fn, layer_axes=axes, sample_size=arm.sample_size), *then)
  return optax.partition({tnnx.QUANTIZED: quantized, tnnx.FULL_PRECISION: full_precision},
                         tnnx.param_labels(model))


def make_model(cfg: LMConfig, bits: int | None, seed: int) -> nnx.Module:
  """The configured :class:`~talr_optax.nnx.TransformerLM`.

  Args:
    cfg: the task's settings (context, width, layers, heads).
    bits: weight bits of the projections; ``None`` for full precision.
    seed: seed of the initial parameters.

  Returns:
    A new model, in training mode.
  """
  return tnnx.TransformerLM(context=cfg.context, width=cfg.width, num_layers=cfg.layers,
                            num_heads=cfg.heads, weight_bits=bits, rngs=nnx.Rngs(seed))


def next_byte_loss(model: nnx.Module, windows: jax.Array) -> jax.Array:
  """Per-position cross-entropy of predicting each next byte.

  Args:
    model: a language model, ``(B, T) ids -> (B, T, 256) logits``.
    windows: ``(B, T + 1)`` byte ids.

  Returns:
    ``(B, T)`` cross-entropies in nats of ``windows[:, 1:]`` given the bytes before.
  """
  logits = model(windows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])


def update(arm: Arm, model: nnx.Module, opt_state: Any, lr_scale: jax.Array,
           windows: jax.Array, then: Sequence[optax.GradientTransformation] = ()
           ) -> tuple[jax.Array, Any]:
  """One update of ``model`` (in place), not compiled: :func:`train_step` compiles it.

  Args:
    arm: the run's settings.
    model: the model; its parameters are updated in place.
    opt_state: the state of ``optimizer(arm, model, lr_scale, then)``.
    lr_scale: the baseline's learning-rate multiple (a float32 scalar).
    windows: ``(B, T + 1)`` byte ids.
    then: see :func:`optimizer`.

  Returns:
    ``(loss, opt_state)``: the mean loss before the update and the new state.
  """
  loss, grads = nnx.value_and_grad(lambda m: next_byte_loss(m, windows).mean())(model)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  updates, opt_state = optimizer(arm, model, lr_scale, then).update(
      nnx.as_pure(grads), opt_state, params)
  nnx.update(model, optax.apply_updates(params, updates))
  return loss, opt_state


@functools.partial(nnx.jit, static_argnums=0)
def train_step(arm: Arm, model: nnx.Module, opt_state: Any, lr_scale: jax.Array,
               windows: jax.Array) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """:func:`update`, compiled once per ``arm``, and the mean rates of the new state.

  Returns:
    ``(loss, opt_state, rates)``: as :func:`update`, and
    :func:`talr_optax.demo.runner.step_metrics` of the new state.
  """
  loss, opt_state = update(arm, model, opt_state, lr_scale, windows)
  return loss, opt_state, step_metrics(opt_state)


@nnx.jit
def _nll_sum(model: nnx.Module, windows: jax.Array) -> jax.Array:
  return next_byte_loss(model, windows).sum()


def bits_per_byte(model: nnx.Module, windows: np.ndarray) -> float:
  """Mean next-byte cross-entropy of ``model`` on ``windows``, in bits.

  Args:
    model: evaluated in evaluation mode (no calibration writes), then put
      back in training mode.
    windows: ``(N, T + 1)`` byte ids, e.g. :func:`lm_data.fixed_windows`.

  Returns:
    Bits per predicted byte, averaged over all ``N * T`` predictions.
  """
  model.eval()
  total = sum(float(_nll_sum(model, jnp.asarray(windows[i:i + EVAL_BATCH])))
              for i in range(0, len(windows), EVAL_BATCH))
  model.train()
  return total / (windows[:, 1:].size * math.log(2))


@dataclasses.dataclass
class _Run:
  """The moving parts of one run."""

  arm: Arm
  model: nnx.Module
  opt_state: Any
  lr_scale: float
  rng: np.random.Generator


def _train(cfg: LMConfig, run: _Run, data: LMData, progress: Progress | None,
           name: str) -> dict[str, Any]:
  """Trains ``run`` for its steps; per-step traces and the validation curve."""
  traces: dict[str, list[float]] = {key: [] for key in TRACE_KEYS}
  quantized = run.arm.bits is not None
  evals: dict[str, list[float]] = {"step": [], "bits_per_byte": [], "md2tp_mean": []}
  lr, target = run.arm.schedule(), run.arm.target() if quantized else None
  scale = jnp.asarray(run.lr_scale, jnp.float32)
  done = 0
  while done < run.arm.steps:
    chunk = min(cfg.eval_every, run.arm.steps - done)
    pending = []
    for _ in range(chunk):
      windows = lm_data.random_windows(data.corpus.train, cfg.context + 1, cfg.batch_size,
                                       run.rng)
      loss, run.opt_state, m = train_step(run.arm, run.model, run.opt_state, scale,
                                          jnp.asarray(windows))
      pending.append((loss, m))
    # One transfer per chunk, not per step.
    append_traces(traces, jax.device_get(pending), lr, target,
                  run.lr_scale if run.arm.method == "sgd" else 1.0)
    done += chunk
    evals["step"].append(done)
    evals["bits_per_byte"].append(bits_per_byte(run.model, data.val))
    if quantized:
      evals["md2tp_mean"].append(float(np.mean(md2tp(run.model))))
    if progress is not None:
      progress.advance(chunk, (
          f"{name} step {done}/{run.arm.steps} loss {np.mean(traces['loss'][-chunk:]):.3f} "
          f"val {evals['bits_per_byte'][-1]:.3f} bits/byte"))
  return {"trace": {k: v for k, v in traces.items() if v},
          "evals": {k: v for k, v in evals.items() if v}}


def pretrain(cfg: LMConfig, data: LMData, seed: int,
             progress: Progress | None = None) -> tuple[nnx.Module, dict[str, Any]]:
  """Pretrains the full-precision model that QAT starts from.

  Args:
    cfg: the task's settings (``fp_steps``, ``fp_lr``, model sizes).
    data: :func:`load`'s corpus and validation windows.
    seed: seed of the initial parameters and of the data order.
    progress: advanced after every evaluation.

  Returns:
    ``(model, info)``: the trained model and its validation curve.
  """
  model = make_model(cfg, None, seed)
  arm = Arm(FP, None, cfg.fp_steps, cfg.fp_lr)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  run = _Run(arm, model, optimizer(arm, model).init(params), 1.0,
             np.random.default_rng(10_000 + seed))
  model.train()
  log = _train(cfg, run, data, progress, f"seed {seed} FP")
  return model, {"seed": seed, "steps": cfg.fp_steps, "evals": log["evals"],
                 "final_bits_per_byte": log["evals"]["bits_per_byte"][-1]}


def _final_groups(opt_state: Any) -> dict[str, dict[str, float]]:
  """Per rate group (``blocks/mlp/up/kernel[1]`` ...) the final K, U and oscillation frequency."""
  out: dict[str, dict[str, float]] = {}
  for key, value in talr.metrics(opt_state).items():
    field, _, name = key.partition("/")
    short = {"ema_transition_rate": "K", "talr": "U", "mean_oscillation_frequency": "osc"}
    if field in short:
      out.setdefault(name, {})[short[field]] = float(value)
  return out


def run_qat(cfg: LMConfig, data: LMData, fp_model: nnx.Module, bits: int, seed: int,
            method: str, lr_scale: float = 1.0, progress: Progress | None = None
            ) -> dict[str, Any]:
  """One QAT run from ``fp_model`` (use it through ``talr_optax.demo.train_arm``).

  Both methods of a seed draw the same training windows (the same ``rng``
  seed), so their difference is the optimizer's alone.

  Args:
    cfg: the task's settings; the run lasts ``cfg.steps``.
    data: :func:`load`'s corpus and validation windows.
    fp_model: the pretrained full-precision model (not modified).
    bits: weight bits.
    seed: seed of the data order (and of the unused initial parameters).
    method: ``"sgd"`` (the AdamW baseline) or ``"talr"`` (AdamWT).
    lr_scale: the baseline's multiple of ``cfg.lr``.
    progress: advanced after every evaluation.

  Returns:
    The run's record for ``results.json``: final and per-evaluation bits
    per byte, final per-group rates, per-step traces and
    ``runner.quantized_record``'s tracking error, late oscillation
    frequency and md2tp histogram.
  """
  model = make_model(cfg, bits, seed)
  tnnx.load_full_precision(model, fp_model)
  rng = np.random.default_rng(seed)
  tnnx.calibrate(model, jnp.asarray(
      lm_data.random_windows(data.corpus.train, cfg.context, cfg.batch_size, rng)))
  arm = Arm(method, bits, cfg.steps, cfg.lr, cfg.lam, cfg.rule, cfg.ema_momentum,
            cfg.sample_size)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  run = _Run(arm, model, optimizer(arm, model, lr_scale).init(params), lr_scale, rng)
  model.train()
  start_bpb = bits_per_byte(model, data.val)
  label = f"seed {seed} W{bits} {cfg.labels[method]}" + (
      f" x{lr_scale:g}" if method == "sgd" else "")
  log = _train(cfg, run, data, progress, label)
  record = {
      "bits": bits,
      "seed": seed,
      "method": method,
      "lr_scale": lr_scale,
      "learning_rate": cfg.lr * (lr_scale if method == "sgd" else 1.0),
      "start_bits_per_byte": start_bpb,
      "final_bits_per_byte": log["evals"]["bits_per_byte"][-1],
      "evals": log["evals"],
      **quantized_record(model, log["trace"], arm.r0),
      "groups": _final_groups(run.opt_state),
      "trace": log["trace"],
  }
  if method == "talr":
    record["export"] = export.export_report(model, make_model(cfg, bits, seed),
                                            lambda m: bits_per_byte(m, data.val),
                                            record["final_bits_per_byte"])
  return record
