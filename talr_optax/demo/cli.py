"""The command line, ``python -m talr_optax.demo [flags]``.

Every flag is checked here, before any work starts: a bad value exits with
status 2 and a message naming the flag and what it accepts. That includes
an ``--out`` or ``--checkpoint-dir`` this process cannot write (tried with a
temporary file), and ``--task lm`` sizes whose activations would not fit in
the machine's memory (:func:`talr_optax.demo.lm_config.activation_bytes`).
The one check that needs the data (``--batch-size`` against the
training-set size) runs as soon as the data is loaded, before any training,
with the same status. Without the ``demo`` extra the command says which
modules are missing and how to install them (status 1).

The command line also chooses the task: :func:`task_of` names each task's
module (``digits``: :mod:`~talr_optax.demo.runs`, ``lm``:
:mod:`~talr_optax.demo.lm_runs`), and :func:`run` and :func:`train_arm` hand
that task to the runner (also as ``talr_optax.demo.task_of``, ``run`` and
``train_arm``, for scripts). Who imports whom: this module imports the
settings (:mod:`~talr_optax.demo.config`, :mod:`~talr_optax.demo.lm_config`,
:mod:`~talr_optax.demo.tasks`, :mod:`~talr_optax.demo.store`) at the top, and
the runner and the task modules, which import Flax, only inside those
functions, once the flags are checked: ``--help`` imports none of them.
Nothing in the package imports this module but ``__main__``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from talr_optax import _checks
from talr_optax.demo import lm_config, store
from talr_optax.demo.config import BASE_LR, QUICK_EPOCHS, DemoConfig, UsageError
from talr_optax.demo.tasks import MODELS, TASKS, Task

if TYPE_CHECKING:  # the runner imports Flax: at run time only inside the functions below
  from talr_optax.demo.runner import Progress, TaskDef

PROG = "python -m talr_optax.demo"
BITS = (1, 2, 3, 4, 8)


def _or_text(text: str, parse: Callable[[str], Any]) -> Any:
  """``parse(text)``, or ``text`` itself for the check to report."""
  try:
    return parse(text)
  except ValueError:
    return text


def _arg_type(check: Callable[[str], Any]) -> Callable[[str], Any]:
  """An argparse ``type`` from a check that raises ``ValueError``."""

  def parse(text: str) -> Any:
    try:
      return check(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None

  return parse


def _positive_int(flag: str) -> Callable[[str], int]:
  return _arg_type(lambda text: _checks.check_int(flag, _or_text(text, int), 1))


def _lam(text: str) -> float:
  value = _or_text(text, float)
  _checks.check_number("--lam", value, 0.0, 0.5, low_open=True)
  return float(value)


def _bits_list(text: str) -> tuple[int, ...]:
  accepted = ", ".join(map(str, BITS))
  items = [item.strip() for item in text.split(",") if item.strip()]
  bits = tuple(_or_text(item, int) for item in items)
  if not bits or any(b not in BITS for b in bits):
    raise ValueError(f"--bits must be a comma-separated list of bit widths in {accepted}, "
                     f"got --bits = {text!r}")
  twice = sorted({b for b in bits if bits.count(b) > 1})
  if twice:
    raise ValueError(f"--bits must not repeat a bit width (each is run once per seed), got "
                     f"--bits = {text!r} with {', '.join(map(str, twice))} more than once")
  return bits


def _not_empty(flag: str, text: str) -> str:
  if not text.strip():
    raise ValueError(f"{flag} must name a directory, got an empty path")
  return text


def _writable(directory: Path) -> str | None:
  """Why a file cannot be created in ``directory``, or None if it can."""
  # A real file, not os.access: that answers for root as if nothing were
  # read-only, and knows nothing of read-only mounts on every platform.
  try:
    with tempfile.TemporaryFile(dir=directory):
      return None
  except OSError as e:
    return e.strerror or type(e).__name__


def _existing_or_new_directory(flag: str) -> Callable[[str], str]:
  """A directory that exists or can be created: not empty, no file in the way, writable."""

  def check(text: str) -> str:
    path = Path(_not_empty(flag, text)).absolute()
    for p in (path, *path.parents):
      if p.exists():
        if not p.is_dir():
          what = "is a file" if p == path else f"is inside {p}, a file"
          raise ValueError(f"{flag} must be a directory, but {text} {what}")
        if (why := _writable(p)) is not None:
          what = "is not writable" if p == path else f"cannot be created in {p}"
          raise ValueError(f"{flag} must be a directory this process can write, but "
                           f"{text} {what} ({why})")
        break
    return text

  return _arg_type(check)


def build_parser() -> argparse.ArgumentParser:
  """The demo's flags, each with the check of its value."""
  p = argparse.ArgumentParser(
      prog=PROG,
      description="QAT with a cosine learning rate vs transition rate scheduling (TALR).")
  p.add_argument("--task", choices=("digits", "lm"), default="digits",
                 help="digits: the image classifiers (see --dataset); lm: a byte-level "
                      "transformer language model, AdamW vs AdamWT (flags below)")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: one seed, few epochs (about a minute on 2 CPU cores)")
  p.add_argument("--bits", type=_arg_type(_bits_list), default=None,
                 help="weight and activation bit widths to run, e.g. 2,1 (default: 2,1; "
                      "weights only, 2,4 with --task lm, 2 with --task lm --quick)")
  p.add_argument("--seeds", type=_positive_int("--seeds"), default=None,
                 help="number of seeds (default 3; 1 with --quick)")
  p.add_argument("--epochs", type=_positive_int("--epochs"), default=None,
                 help="QAT epochs per run (default 60 on digits, 400 on cifar10)")
  p.add_argument("--fp-epochs", type=_positive_int("--fp-epochs"), default=None,
                 help="full-precision pretraining epochs (default 15 on digits)")
  p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None,
                 help="batch size, at most the training-set size (default "
                      f"{TASKS['digits'].defaults.batch_size} on digits, "
                      f"{TASKS['cifar10'].defaults.batch_size} on cifar10, "
                      f"{lm_config.LMConfig.batch_size} windows with --task lm)")
  p.add_argument("--rule", choices=("multiplicative", "additive"), default="multiplicative",
                 help="TALR rule (default: multiplicative, the better-tracking one here)")
  p.add_argument("--optimizer", choices=tuple(BASE_LR), default="sgd",
                 help="sgd: SGD vs SGDT (lr 0.1); adam: Adam vs AdamT (lr 1e-3)")
  p.add_argument("--lam", type=_arg_type(_lam), default=5e-3,
                 help="target scale lambda in (0, 0.5]: R_0 = lambda * sqrt(bits) (default 5e-3)")
  p.add_argument("--sample-size", type=_positive_int("--sample-size"), default=None,
                 metavar="N",
                 help="count transitions on a fixed grid of at most N weights per quantized "
                      "tensor, for TALR and the baseline's monitor (default: every weight)")
  p.add_argument("--dataset", choices=tuple(TASKS), default="digits",
                 help="; ".join(f"{t.name}: {t.help}" for t in TASKS.values()))
  p.add_argument("--model", choices=tuple(MODELS), default=None,
                 help="; ".join(f"{' or '.join(t.models)} with {t.name} (default {t.models[0]})"
                                for t in TASKS.values()))
  p.add_argument("--data-dir", default=None,
                 type=_arg_type(lambda text: _not_empty("--data-dir", text)),
                 help="directory of the data, for the datasets that need one")
  p.add_argument("--out", default=None, type=_existing_or_new_directory("--out"),
                 help="output directory (default runs/demo; runs/lm with --task lm)")
  p.add_argument("--checkpoint-dir", default=None,
                 type=_existing_or_new_directory("--checkpoint-dir"),
                 help="save each run after every epoch here, and resume from it")
  lm_config.add_arguments(p, _arg_type, _positive_int)
  return p


def _check_task_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      task: Task) -> str:
  """The model for ``task`` (``--model`` or its default); checks ``--data-dir``."""
  if task.data_dir and not args.data_dir:
    parser.error(f"--dataset {task.name} needs --data-dir DIR ({task.data_dir})")
  if args.data_dir and not task.data_dir:
    parser.error(f"--data-dir is not used with --dataset {task.name}; drop it, or choose "
                 f"one of: {', '.join(t.name for t in TASKS.values() if t.data_dir)}")
  model = args.model or task.models[0]
  if model not in task.models:
    parser.error(f"--model {model} does not fit --dataset {task.name}; "
                 f"use --model {' or '.join(task.models)}")
  return model


def _check_checkpoint_dir(parser: argparse.ArgumentParser, cfg: DemoConfig) -> None:
  if importlib.util.find_spec("orbax") is None:
    parser.error("--checkpoint-dir needs orbax-checkpoint: pip install orbax-checkpoint")
  try:
    store.check_config(cfg)
  except ValueError as e:
    parser.error(str(e))


def config_from_args(argv: Sequence[str] | None = None,
                     parser: argparse.ArgumentParser | None = None
                     ) -> DemoConfig | lm_config.LMConfig:
  """Parses and checks the command line (a bad flag exits with status 2)."""
  parser = parser or build_parser()
  args = parser.parse_args(argv)
  if args.task == "lm":
    return lm_config.config_from_args(parser, args, dict(
        bits=args.bits, seeds=args.seeds, batch_size=args.batch_size, rule=args.rule,
        lam=args.lam, sample_size=args.sample_size, out=args.out))
  lm_config.check_not_lm(parser, args)
  task = TASKS[args.dataset]
  model = _check_task_flags(parser, args, task)
  quick_epochs, quick_fp_epochs = QUICK_EPOCHS
  cfg = DemoConfig(
      dataset=task.name,
      model=model,
      bits=args.bits or (2, 1),
      seeds=args.seeds or (1 if args.quick else 3),
      epochs=args.epochs or (quick_epochs if args.quick else task.defaults.epochs),
      fp_epochs=args.fp_epochs or (quick_fp_epochs if args.quick else task.defaults.fp_epochs),
      batch_size=args.batch_size or task.defaults.batch_size,
      optimizer=args.optimizer,
      rule=args.rule,
      lam=args.lam,
      sample_size=args.sample_size,
      data_dir=args.data_dir,
      out=args.out or DemoConfig.out,
      checkpoint_dir=args.checkpoint_dir,
  )
  if cfg.checkpoint_dir is not None:
    _check_checkpoint_dir(parser, cfg)
  return cfg


# What the demo imports beyond the core (the "demo" extra), by module name.
DEMO_MODULES = ("flax", "matplotlib", "rich")
EXTRA = 'pip install -e ".[demo]" (in a clone; from PyPI: pip install "talr_optax[demo]")'


def missing_modules(cfg: DemoConfig | lm_config.LMConfig) -> list[str]:
  """The modules of the ``demo`` extra that ``cfg``'s run needs and cannot import."""
  needed = DEMO_MODULES + (("sklearn",) if getattr(cfg, "dataset", None) == "digits" else ())
  return [name for name in needed if importlib.util.find_spec(name) is None]


# ---------------------------------------------------------------------------
# The task of a run, by name


def task_of(name: str) -> TaskDef:
  """The task called ``name``, from the module that defines it.

  Args:
    name: ``"digits"`` (the image tasks, ``--dataset digits`` or ``cifar10``)
      or ``"lm"`` (``--task lm``).

  Returns:
    The task's :class:`~talr_optax.demo.runner.TaskDef`.

  Raises:
    ValueError: another name.
  """
  # Imported here, not at the top: the task modules import Flax.
  if name == "lm":
    from talr_optax.demo import lm_runs  # pylint: disable=import-outside-toplevel
    return lm_runs.TASK
  if name == "digits":
    from talr_optax.demo import runs  # pylint: disable=import-outside-toplevel
    return runs.TASK
  raise ValueError(f"task must be 'digits' or 'lm', got {name!r}")


def run(cfg: DemoConfig | lm_config.LMConfig, **procedure_kwargs: Any) -> dict[str, Any]:
  """Runs the whole demo of ``cfg``'s task (see :func:`talr_optax.demo.runner.run`).

  Args:
    cfg: a ``DemoConfig`` (image tasks) or an ``LMConfig`` (``cfg.task``).
    **procedure_kwargs: passed to the task's procedure (test hooks).

  Returns:
    The results, as written to ``results.json``.

  Raises:
    UsageError: a flag does not fit the data (checked before any training).
    FileNotFoundError, ValueError: missing or corrupt data or checkpoints.
  """
  from talr_optax.demo import runner  # pylint: disable=import-outside-toplevel
  return runner.run(task_of(getattr(cfg, "task", "digits")), cfg, **procedure_kwargs)


def train_arm(task: str | TaskDef, cfg: Any, data: Any, fp_model: Any, *, bits: int,
              seed: int, method: str, lr_scale: float = 1.0,
              progress: Progress | None = None) -> dict[str, Any]:
  """One arm of a task for one seed, the task by name (:func:`talr_optax.demo.runner.train_arm`).

  For example, the language model's AdamWT at 2 bits for 500 steps::

    from talr_optax.demo import task_of, train_arm
    from talr_optax.demo.lm_config import LMConfig
    cfg = LMConfig(steps=500)
    data = task_of("lm").load(cfg)
    fp_model = task_of("lm").pretrain(cfg, data, 0, None)
    record = train_arm("lm", cfg, data, fp_model, bits=2, seed=0, method="talr")
    record["final_bits_per_byte"], record["trace"]["K"]

  Args:
    task: ``"digits"``, ``"lm"`` (see :func:`task_of`) or a ``TaskDef``.
    cfg: the task's settings; the run's length is ``cfg.epochs`` or ``cfg.steps``.
    data: ``task.load(cfg)``.
    fp_model: ``task.pretrain(...)``'s model; not modified.
    bits: weight (and, on images, activation) bits.
    seed: seed of the data order.
    method: ``"sgd"`` (the baseline) or ``"talr"``.
    lr_scale: the baseline's multiple of the base learning rate (language
      model only).
    progress: shows the run's progress (``None``: silent).

  Returns:
    The run's record, as in ``results.json``'s ``runs``.

  Raises:
    TypeError: ``task`` is neither a name nor a ``TaskDef``.
    ValueError: an unknown task or method, or ``lr_scale`` != 1 on images.
  """
  from talr_optax.demo import runner  # pylint: disable=import-outside-toplevel
  task = task_of(task) if isinstance(task, str) else task
  return runner.train_arm(task, cfg, data, fp_model, bits=bits, seed=seed, method=method,
                          lr_scale=lr_scale, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the demo; 0 on success, 1 for missing or corrupt files, 2 for bad flags."""
  parser = build_parser()
  cfg = config_from_args(argv, parser)
  if missing := missing_modules(cfg):
    print(f"error: the demo needs {', '.join(missing)}, not installed here; install the "
          f"demo extra: {EXTRA}", file=sys.stderr)
    return 1
  try:
    run(cfg)
  except UsageError as e:
    parser.error(str(e))
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0
