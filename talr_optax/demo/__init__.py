"""Demo: QAT with a plain learning-rate schedule vs transition rate scheduling.

    python -m talr_optax.demo            # digits, small CNN, W2A2 and W1A1, 3 seeds
    python -m talr_optax.demo --quick    # one seed, few epochs: a smoke run
    python -m talr_optax.demo --task lm  # a byte-level transformer, AdamW vs AdamWT

For each bit width and seed a full-precision model is trained briefly, then
two QAT runs start from it:

* baseline: SGD (or Adam) with a cosine learning rate on every parameter
  (transitions recorded with :func:`talr_optax.track_transitions`);
* TALR: the same optimizer, but the quantized weights move by the
  transition-adaptive learning rate that makes their transition rate follow
  the cosine target ``R_0 = 5e-3 * sqrt(b)`` (Lee et al., ICCV 2025).

Results go to ``--out``: ``results.json`` (every figure and per-step trace;
mode 0o644, readable by everyone as the figures are) and five PNG figures
(``rate_tracking``, ``learning_rates``, ``accuracy``, ``weight_changes``,
``oscillations``); ``--task lm`` draws ``bits_per_byte`` in place of
``accuracy`` and adds ``lr_sweep``: six. ``--checkpoint-dir`` makes runs
resumable. On a terminal a progress bar runs; in a file or a pipe each epoch
(or evaluation) prints one plain line, and the tables keep each row on one
line. The tables' terms (md2tp, late oscillation frequency, ``|K-R|/R0``)
are explained below them.

One runner, two tasks. :mod:`~talr_optax.demo.runner` holds what every task
shares, once: the per-step traces, the record of a QAT run (tracking error,
late oscillation frequency, md2tp histogram), the summary over seeds, the
progress display, writing the results, and :func:`~talr_optax.demo.runner.train_arm`
(one arm of a task for one seed, for scripts that study the demo's runs; by
name as ``talr_optax.demo.train_arm``). A task contributes its data, model,
optimizer arms, training step and the order of its runs:

* the image tasks (``--dataset digits`` or ``cifar10``):
  :mod:`~talr_optax.demo.runs` (their runs), :mod:`~talr_optax.demo.tasks`
  (data, models, loss and score), :mod:`~talr_optax.demo.data` (loaders),
  :mod:`~talr_optax.demo.optim` (the arms' parameter groups),
  :mod:`~talr_optax.demo.train` (one run), :mod:`~talr_optax.demo.store`
  (``--checkpoint-dir``);
* the language model (``--task lm``): :mod:`~talr_optax.demo.lm_runs`
  (pretraining, the baseline's sweep, seeds), :mod:`~talr_optax.demo.lm_config`
  (settings, flags), :mod:`~talr_optax.demo.lm_data` (the standard library's
  bytes), :mod:`~talr_optax.demo.lm_train` (model, arms, step, one run).

Who imports whom, top down, with no circle: :mod:`~talr_optax.demo.cli`
(imported by ``__main__``) checks every flag before any work and chooses the
task by name (:func:`~talr_optax.demo.cli.task_of`); it imports the task's
module (``runs`` or ``lm_runs``) only then, inside a function. A task module
imports its training module (``train``, ``lm_train``) and the runner, and
hands the runner its ``TASK``; the training modules import the runner's
shared parts too; the runner imports none of them (only ``export``,
``plots``, ``store`` and ``config``). This package's ``__init__`` imports its
public names from their modules on first use.
:mod:`~talr_optax.demo.plots` draws the figures. The library never imports
this package; the data loaders need neither Flax nor Orbax. Without the
``demo`` extra (Flax, scikit-learn, matplotlib, rich, Orbax) the command
says so: ``pip install -e ".[demo]"``.
"""

import importlib
from typing import Any

# Public names, imported on first use so `talr_optax.demo.data` stays light.
_EXPORTS = {
    "DemoConfig": "config",
    "UsageError": "config",
    "build_parser": "cli",
    "config_from_args": "cli",
    "main": "cli",
    "run": "cli",
    "train_arm": "cli",
    "task_of": "cli",
    "RunStore": "store",
    "Interrupted": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
