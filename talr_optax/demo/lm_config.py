"""Settings of the language-model task (``--task lm``) and its command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable

from talr_optax import _checks

# Method keys as in the digits task ("sgd": the baseline), with AdamW names.
LM_LABELS = {"sgd": "AdamW", "talr": "AdamWT"}
# Validation: every 10th file of the standard library is held out.
VAL_EVERY = 10
# Validation windows per compiled evaluation call.
EVAL_BATCH = 128


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Everything an ``--task lm`` run depends on (written to ``results.json``).

  Attributes:
    bits: weight bit widths (weight-only quantization).
    seeds: seeds 0 .. seeds - 1; each pretrains its own model.
    steps: QAT steps per run.
    fp_steps: full-precision pretraining steps.
    batch_size: windows per step.
    context: window length in bytes (the model's context).
    width: model width; ``heads`` heads of ``width // heads``.
    layers: transformer blocks (stacked and scanned).
    heads: attention heads.
    lr: AdamWT's base rate ``U_0``, and the cosine learning rate of the
      full-precision parameters in QAT.
    fp_lr: peak learning rate of the pretraining.
    baseline_lrs: multiples of ``lr`` the baseline's sweep tries on seed 0.
    eval_every: steps between validation evaluations.
    eval_windows: fixed validation windows of ``context + 1`` bytes.
    rule: TALR rule.
    lam: the target's ``lambda``: ``R_0 = lam * sqrt(bits)``.
    ema_momentum: momentum ``m`` of the transition-rate EMA ``K`` (both
      arms) and of TALR's learning-rate factor.
    sample_size: count transitions and oscillations on a fixed grid of at
      most this many weights per layer of each kernel (``None``: all).
    out: output directory.
  """

  bits: tuple[int, ...] = (2, 4)
  seeds: int = 3
  steps: int = 1000
  fp_steps: int = 2000
  batch_size: int = 16
  context: int = 64
  width: int = 64
  layers: int = 2
  heads: int = 2
  lr: float = 3e-4
  fp_lr: float = 3e-3
  baseline_lrs: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
  eval_every: int = 100
  eval_windows: int = 256
  rule: str = "multiplicative"
  lam: float = 5e-3
  # The paper's 0.99 averages over ~100 steps, 0.1 % of its runs; over 1000
  # steps it lags the cosine target (U may fall by at most 1 % per step).
  # 0.95 averages over ~20 steps, 2 % of a run.
  ema_momentum: float = 0.95
  sample_size: int | None = None
  out: str = "runs/lm"
  task: str = "lm"

  @property
  def labels(self) -> dict[str, str]:
    """Display names of the baseline and TALR methods."""
    return LM_LABELS


# A --quick run: W2 only, one seed, short runs, the same model.
QUICK = dict(bits=(2,), seeds=1, steps=300, fp_steps=500, eval_every=50, eval_windows=128)


# Flags of --task lm only, as (flag, LMConfig field, help). Their defaults are
# LMConfig's; the parser keeps None so that a flag given to digits is seen.
_INT_FLAGS = (
    ("--steps", "steps", "QAT steps per run"),
    ("--fp-steps", "fp_steps", "full-precision pretraining steps"),
    ("--context", "context", "window length in bytes (the model's context)"),
    ("--width", "width", "model width"),
    ("--layers", "layers", "transformer blocks"),
    ("--heads", "heads", "attention heads (must divide --width)"),
    ("--eval-every", "eval_every", "steps between validation evaluations"),
)
LM_FLAGS = tuple(flag for flag, _, _ in _INT_FLAGS) + ("--lr", "--baseline-lrs",
                                                       "--ema-momentum")
# Flags of the image tasks, refused with --task lm.
IMAGE_FLAGS = ("--epochs", "--fp-epochs", "--model", "--data-dir", "--checkpoint-dir")
# Image flags with a default: refused with --task lm when set to another value.
IMAGE_CHOICES = ("--dataset", "--optimizer")


def _dest(flag: str) -> str:
  return flag[2:].replace("-", "_")


def _number(flag: str, text: str, low: float, high: float, *, low_open: bool,
            high_open: bool = True) -> float:
  try:
    value = float(text)
  except ValueError:
    value = text
  _checks.check_number(flag, value, low, high, low_open=low_open, high_open=high_open)
  return float(value)


def _lr_multiples(text: str) -> tuple[float, ...]:
  items = [item.strip() for item in text.split(",") if item.strip()]
  try:
    values = tuple(float(item) for item in items)
  except ValueError:
    values = ()
  if not values or not all(0 < v < float("inf") for v in values):
    raise ValueError(f"--baseline-lrs must be a comma-separated list of multiples of --lr, "
                     f"each > 0, e.g. 1,3,10, got --baseline-lrs = {text!r}")
  if len(set(values)) != len(values):
    raise ValueError(f"--baseline-lrs must not repeat a value, got --baseline-lrs = {text!r}")
  return values


def add_arguments(parser: argparse.ArgumentParser,
                  arg_type: Callable[[Callable[[str], Any]], Callable[[str], Any]],
                  positive_int: Callable[[str], Callable[[str], int]]) -> None:
  """Adds the ``--task lm`` flags to the demo's parser.

  Args:
    parser: the demo's parser.
    arg_type: turns a check raising ``ValueError`` into an argparse ``type``.
    positive_int: ``positive_int(flag)``, the ``type`` of an int >= 1 flag.
  """
  group = parser.add_argument_group(
      "--task lm", "a byte-level transformer on the Python standard library's source")
  d = LMConfig()
  for flag, field, text in _INT_FLAGS:
    group.add_argument(flag, type=positive_int(flag), default=None,
                       help=f"{text} (default {getattr(d, field)})")
  group.add_argument("--lr", default=None, help=f"AdamWT's base rate U_0 and the cosine "
                     f"learning rate of the full-precision parameters (default {d.lr:g})",
                     type=arg_type(lambda t: _number("--lr", t, 0.0, 1.0, low_open=True,
                                                     high_open=False)))
  group.add_argument("--baseline-lrs", type=arg_type(_lr_multiples), default=None,
                     help="multiples of --lr the baseline's learning-rate sweep tries on "
                          "seed 0 (default " + ",".join(f"{v:g}" for v in d.baseline_lrs) + ")")
  group.add_argument("--ema-momentum", default=None,
                     type=arg_type(lambda t: _number("--ema-momentum", t, 0.0, 1.0,
                                                     low_open=False)),
                     help=f"momentum m in [0, 1) of K and of TALR's rate (default "
                          f"{d.ema_momentum:g})")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     shared: dict[str, Any]) -> LMConfig:
  """The :class:`LMConfig` of parsed flags; a flag that does not fit exits with status 2.

  Args:
    parser: the demo's parser (for its errors).
    args: the parsed flags.
    shared: values of the flags both tasks use, as the digits task resolved
      them (``None`` where not given): bits, seeds, batch_size, rule, lam,
      sample_size, out.
  """
  for flag in IMAGE_FLAGS:
    if getattr(args, _dest(flag)) is not None:
      parser.error(f"{flag} is not used with --task lm; drop it")
  for flag in IMAGE_CHOICES:
    if getattr(args, _dest(flag)) != parser.get_default(_dest(flag)):
      parser.error(f"{flag} is not used with --task lm; drop it")
  values = {field: getattr(args, _dest(flag)) for flag, field, _ in _INT_FLAGS}
  values.update(lr=args.lr, baseline_lrs=args.baseline_lrs, ema_momentum=args.ema_momentum)
  values.update(shared)
  if args.quick:
    values = {**QUICK, **{k: v for k, v in values.items() if v is not None}}
  cfg = LMConfig(**{k: v for k, v in values.items() if v is not None})
  if cfg.width % cfg.heads:
    parser.error(f"--heads must divide --width, got --width = {cfg.width}, --heads = "
                 f"{cfg.heads}")
  _check_memory(parser, cfg)
  return cfg


def activation_bytes(cfg: LMConfig) -> int:
  """An estimate of the peak memory of a training step's activations, in bytes.

  Per window position and layer a pre-norm block keeps about ``20 * width``
  float32 values for the backward pass (norms, query/key/value, attention
  output, the 4x MLP and its activation, residuals) and ``2 * heads * context``
  attention scores and probabilities; the logits add ``3 * 256`` per position.
  The backward pass holds about as much again. Evaluation runs
  ``min(eval_windows, EVAL_BATCH)`` windows forward, one layer at a time.

  Args:
    cfg: the task's settings.

  Returns:
    The larger of the training step's and the evaluation's estimate.
  """
  per_layer = 20 * cfg.width + 2 * cfg.heads * cfg.context
  head = 2 * cfg.width + 3 * 256
  train = 2 * cfg.batch_size * cfg.context * (cfg.layers * per_layer + head)
  evaluation = min(cfg.eval_windows, EVAL_BATCH) * cfg.context * (per_layer + head)
  return 4 * max(train, evaluation)


def memory_bytes() -> int | None:
  """This machine's physical memory, or None where the platform does not say."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
    return None


def _check_memory(parser: argparse.ArgumentParser, cfg: LMConfig) -> None:
  """Refuses sizes whose activations cannot fit in this machine's memory."""
  need, limit = activation_bytes(cfg), memory_bytes()
  if limit is None or need <= limit:
    return
  gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
  parser.error(
      f"--batch-size {cfg.batch_size} with --context {cfg.context} (--width {cfg.width}, "
      f"--layers {cfg.layers}, --heads {cfg.heads}) needs about {gib(need)} of activations, "
      f"more than this machine's {gib(limit)} of memory; lower --batch-size or --context")


def check_not_lm(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Refuses ``--task lm`` flags on another task (status 2, naming the flag).

  Args:
    parser: the demo's parser (for its errors).
    args: the parsed flags.
  """
  for flag in LM_FLAGS:
    if getattr(args, _dest(flag)) is not None:
      parser.error(f"{flag} is used with --task lm only; add --task lm or drop it")
