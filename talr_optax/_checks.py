"""Argument checks shared by every module (private).

Checks run where arguments enter the library (factories, ``init``,
constructors, the command line), never on the hot path of a step, and they
only read values that are concrete Python or NumPy numbers: a traced value
(e.g. a hyperparameter re-injected by ``optax.inject_hyperparams``) passes
unchecked, so eager and jitted calls behave the same.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def prefix(owner: Optional[str]) -> str:
  return f"{owner}: " if owner else ""


def _is_bool(value: Any) -> bool:
  return isinstance(value, (bool, np.bool_))


def concrete_float(value: Any) -> Optional[float]:
  """``value`` as a float if it is a concrete real scalar, else ``None``."""
  if isinstance(value, jax.core.Tracer) or _is_bool(value):
    return None
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  # jnp.issubdtype knows bfloat16, which NumPy calls non-numeric.
  if array.shape != () or not jnp.issubdtype(array.dtype, jnp.number):
    return None
  if jnp.issubdtype(array.dtype, jnp.complexfloating):
    return None
  return float(array)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
  return ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf,
                 *, low_open: bool = False, high_open: bool = False,
                 owner: Optional[str] = None) -> None:
  """Raises a ``ValueError`` unless ``value`` is a finite real number in range.

  A traced scalar passes: its value is unknown until the step runs.
  """
  if isinstance(value, jax.core.Tracer):
    if getattr(value, "shape", None) == ():
      return
    raise ValueError(f"{prefix(owner)}{name} must be a scalar, got shape {value.shape}.")
  x = concrete_float(value)
  if x is None:
    raise ValueError(
        f"{prefix(owner)}{name} must be a real number, got {name} = {value!r}.")
  ok = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
  if not (ok and math.isfinite(x)):
    raise ValueError(
        f"{prefix(owner)}{name} must be in {_interval(low, high, low_open, high_open)},"
        f" got {name} = {x!r}.")


def is_integer_array(x: Any) -> bool:
  """``x`` has an integer dtype (quantization levels, not weights)."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.integer)


def check_int(name: str, value: Any, low: int = 1, high: Optional[int] = None,
              *, owner: Optional[str] = None) -> int:
  """``value`` as an ``int`` if it is an integer (not a bool) in ``[low, high]``."""
  ok = isinstance(value, numbers.Integral) and not _is_bool(value)
  if ok:
    ok = value >= low and (high is None or value <= high)
  if not ok:
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(
        f"{prefix(owner)}{name} must be an integer {bound}, got {name} = {value!r}.")
  return int(value)


def check_bool(name: str, value: Any, *, owner: Optional[str] = None) -> bool:
  """``value`` as a ``bool`` if it is one (Python or NumPy)."""
  if not _is_bool(value):
    raise ValueError(
        f"{prefix(owner)}{name} must be True or False, got {name} = {value!r}.")
  return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[Any],
                 *, owner: Optional[str] = None) -> Any:
  """``value`` if it is one of ``choices``."""
  if not any(value == c and type(value) is type(c) for c in choices):
    raise ValueError(
        f"{prefix(owner)}{name} must be one of {tuple(choices)}, got {name} = {value!r}.")
  return value


def check_callable(name: str, value: Any, what: str, *, owner: Optional[str] = None
                   ) -> Callable[..., Any]:
  """``value`` if it is callable; ``what`` says which signature is expected."""
  if not callable(value):
    raise ValueError(
        f"{prefix(owner)}{name} must be {what}, got {name} of type"
        f" {type(value).__name__}.")
  return value


def check_scalar_or_schedule(name: str, value: Any, *, low_open: bool = True,
                             owner: Optional[str] = None) -> None:
  """A schedule (any callable) or a number in ``(0, inf)`` (``[0, inf)``)."""
  if not callable(value):
    check_number(name, value, 0.0, math.inf, low_open=low_open, high_open=True, owner=owner)


def check_sample_size(sample_size: Any) -> Optional[int]:
  """``None`` or an int >= 1; an array gets the ``optax.inject_hyperparams`` hint."""
  if isinstance(sample_size, jax.Array):
    raise ValueError(
        f"sample_size must be an integer >= 1, got an array ({sample_size!r}): under"
        " optax.inject_hyperparams pass static_args=('sample_size',), since it turns"
        " numbers into traced arrays.")
  return None if sample_size is None else check_int("sample_size", sample_size, 1)


def check_bits(name: str, value: Any, *, owner: Optional[str] = None) -> int:
  """A bit width of the paper's quantizers: an integer in ``[1, 8]``."""
  return check_int(name, value, 1, 8, owner=owner)


def raise_if_step_count(params: Any, name: str = "levels_fn") -> None:
  """Raises a hint when ``name`` (a callable of params) receives a step count instead.

  ``optax.inject_hyperparams`` treats every callable argument as a schedule
  and calls it with the step count unless it is named in ``static_args``.
  """
  if getattr(params, "shape", None) == () and jnp.issubdtype(
      getattr(params, "dtype", np.float32), jnp.integer):
    raise ValueError(
        f"{name} was called with a step count instead of params: under"
        f" optax.inject_hyperparams pass static_args=({name!r},), since it"
        " treats every callable argument as a schedule.")
