"""Errors that name the extra to install when an optional dependency is missing (private).

The core needs only JAX, Optax and NumPy. A sub-package that needs more calls
:func:`require` before its first import of the optional module, so that a
core-only install fails with the ``pip`` command that fixes it instead of a
bare ``No module named 'flax'`` from deep inside the sub-package.
"""

from __future__ import annotations

import importlib
from typing import Sequence


def require(owner: str, modules: Sequence[str], extra: str) -> None:
  """Imports ``modules``; if one is missing, says which extra brings it.

  Args:
    owner: the importing package, e.g. ``"talr_optax.nnx"``.
    modules: top-level modules it needs, e.g. ``("flax",)``.
    extra: the optional-dependency group of ``pyproject.toml`` that installs
      them, e.g. ``"nnx"``.

  Raises:
    ModuleNotFoundError: naming ``owner``, the missing module and the
      ``pip install`` command of ``extra`` (chained to the original error).
  """
  for module in modules:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      raise ModuleNotFoundError(
          f"{owner} needs the optional dependency '{module}', which could not be "
          f"imported ({e}). Install talr_optax with its '{extra}' extra: "
          f"pip install -e \".[{extra}]\" from the repository root.",
          name=e.name,
      ) from e
