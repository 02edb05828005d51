"""Tree paths and unboxing, shared by every module (private).

Parameters reach the library in several forms: plain pytrees, ``nnx.State``
whose leaves are ``nnx.Variable`` boxes (what ``nnx.Optimizer`` gives
``init``), Linen ``AxisMetadata`` boxes, and ``optax.MaskedNode`` under
``optax.masked`` / ``optax.partition``. These helpers treat a box as one leaf
and name every leaf by the same path in each form, without importing Flax.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax


def is_boxed(x: Any) -> bool:
  """An ``nnx.Variable`` or a Linen ``AxisMetadata``: a box around one array."""
  if isinstance(x, jax.Array):
    return False
  return callable(getattr(x, "get_value", None)) or callable(getattr(x, "unbox", None))


def unbox(x: Any) -> Any:
  """The array inside a box (see :func:`is_boxed`); anything else unchanged."""
  if isinstance(x, jax.Array):
    return x
  get_value = getattr(x, "get_value", None)  # nnx.Variable
  if callable(get_value):
    return get_value()
  unbox_fn = getattr(x, "unbox", None)  # Linen AxisMetadata
  if callable(unbox_fn):
    return unbox_fn()
  return x


def is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def is_none_or_masked(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def is_leaf(x: Any) -> bool:
  """Where to stop flattening: ``None``, ``MaskedNode`` and boxes are leaves."""
  return x is None or isinstance(x, optax.MaskedNode) or is_boxed(x)


def path_str(path: tuple[Any, ...]) -> str:
  """``"conv1/kernel"`` for a jax key path (dict keys, attributes, indices)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def leaves_with_paths(tree: Any, is_leaf_fn: Optional[Callable[[Any], bool]] = is_leaf
                      ) -> list[tuple[str, Any]]:
  """``(path string, leaf)`` pairs, boxes, ``None`` and ``MaskedNode`` included."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf_fn)
  return [(path_str(path), leaf) for path, leaf in leaves]
