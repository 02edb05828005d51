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

Results go to ``--out``: ``results.json`` (every figure and per-step trace)
and four PNG figures. ``--checkpoint-dir`` makes runs resumable.

Modules, one job each: :mod:`~talr_optax.demo.cli` (flags and their checks),
:mod:`~talr_optax.demo.tasks` (data, models, loss and score of each task),
:mod:`~talr_optax.demo.data` (loaders), :mod:`~talr_optax.demo.optim`
(parameter groups), :mod:`~talr_optax.demo.train` (one run),
:mod:`~talr_optax.demo.runs` (all runs, results), :mod:`~talr_optax.demo.store`
(checkpoints), :mod:`~talr_optax.demo.summary` and
:mod:`~talr_optax.demo.plots` (table and figures). The language-model task
(``--task lm``) has its own modules: :mod:`~talr_optax.demo.lm_config`
(settings, flags), :mod:`~talr_optax.demo.lm_data` (the standard library's
bytes), :mod:`~talr_optax.demo.lm_train` (one run) and
:mod:`~talr_optax.demo.lm_runs` (the procedure, results). The library never imports
this package; the data loaders need neither Flax nor Orbax.
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
    "run": "runner",
    "train_arm": "runner",
    "task_of": "runner",
    "RunStore": "store",
    "Interrupted": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
