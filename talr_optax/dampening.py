"""Oscillation dampening (Nagel et al., 2022) as an Optax stage.

A latent weight that oscillates sits near a transition point, between two
levels. Dampening adds the regulariser ``lambda(t) * sum (w - center(w))**2``,
with ``center(w)`` the latent value of w's current level held constant,
which pulls every weight towards the centre of its bin, away from the
transition points. :func:`dampen_oscillations` adds its gradient,
``2 lambda(t) (w - center(w))``, to the updates before the optimizer's
scaling, as ``optax.add_decayed_weights`` adds weight decay.

The centres come from a ``centers_fn(params)``:
:func:`talr_optax.centers_fn_from_scales` for plain params,
:func:`talr_optax.nnx.centers_fn_for` for the NNX layers and
:func:`talr_optax.qwix.centers_fn_from_qwix` for Qwix models.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from talr_optax import _checks
from talr_optax import _tree

__all__ = ["CentersFn", "DampenOscillationsState", "dampen_oscillations"]

CentersFn = Callable[..., Any]


class DampenOscillationsState(NamedTuple):
  """State of :func:`dampen_oscillations`.

  Attributes:
    dampening_count: number of updates done (int32), the step of a
      ``strength`` schedule.
  """

  dampening_count: jax.Array


def _check_strength(strength: Any) -> None:
  """A float in [0, inf), or a schedule whose value at step 0 is one (when concrete)."""
  if not callable(strength):
    _checks.check_number("strength", strength, 0.0, float("inf"), high_open=True)
    return
  x = _checks.concrete_float(strength(jnp.asarray(0, jnp.int32)))
  if x is not None and not x >= 0.0:
    raise ValueError(
        "strength must be a coefficient in [0, inf); it is a schedule whose value"
        f" at step 0 is {x!r}.")


def quantized_centers(centers_fn: CentersFn, params: Any, owner: str
                      ) -> tuple[list[Any], list[Any], Any]:
  """``(param leaves, centre leaves, treedef)`` of ``centers_fn(params)``, checked.

  The centres must be a pytree with the structure of params (or a prefix of it
  holding ``None``) with, at each quantized leaf, an array of the param's
  shape. Used by both remedies.
  """
  centers = centers_fn(params)
  leaves, treedef = jax.tree.flatten(centers, is_leaf=_tree.is_none_or_masked)
  try:
    param_leaves = treedef.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{owner}: centers_fn returned a pytree whose structure does not match the"
        " params: it must return a pytree with the structure of params, an array"
        f" per quantized leaf and None elsewhere. ({e})") from None
  out = []
  for i, (c, p) in enumerate(zip(leaves, param_leaves)):
    if _tree.is_none_or_masked(c) or _tree.is_none_or_masked(p):
      out.append(None)
      continue
    shape, want = getattr(c, "shape", None), getattr(_tree.unbox(p), "shape", None)
    if shape is None or want is None or tuple(shape) != tuple(want):
      raise ValueError(
          f"{owner}: centers_fn returned {type(c).__name__} of shape {shape} at leaf"
          f" {i}, where the param has shape {want}: it must return one centre per"
          " weight.")
    out.append(c)
  if all(c is None for c in out):
    raise ValueError(
        f"{owner}: centers_fn returned no quantized leaf (only None): there is"
        " nothing to act on. Pass the centers_fn of the quantized model.")
  return param_leaves, out, treedef


def dampen_oscillations(centers_fn: CentersFn, strength: optax.ScalarOrSchedule
                        ) -> optax.GradientTransformationExtraArgs:
  r"""Adds the gradient of the oscillation-dampening regulariser to the updates.

  .. math::

    g_n \leftarrow g_n + 2 \lambda(n) (w_n - \operatorname{sg}(c(w_n)))

  on quantized leaves (others pass unchanged), which is the gradient of
  ``lambda(n) * sum (w - stop_gradient(c(w)))**2`` added to the loss. Put
  it before the optimizer's scaling, e.g. ``optax.chain(
  dampen_oscillations(centers_fn, 1e-2), optax.adamw(1e-3))``, or before
  ``scale_by_adam`` in a chain with :func:`talr_optax.scale_by_talr`.

  Nagel et al. anneal ``lambda`` with a cosine from its initial to its final
  value after a quarter of training:
  :func:`talr_optax.delayed_cosine_schedule`. The term is a sum over
  weights (their ``aggregation="sum"``). They clip ``w`` to the quantizer's range in the
  term, so a weight beyond the outer levels feels no pull; the centres
  functions of this library give such a weight itself as its centre.

  Under ``optax.inject_hyperparams`` pass ``static_args=("centers_fn",)``:
  it treats callables as schedules.

  Safe behaviour: a schedule's negative or NaN value counts as 0 at that
  step (a schedule cannot raise under jit).

  Args:
    centers_fn: ``params -> centres``, a pytree with the structure of params
      holding the latent value of each quantized weight's current level and
      ``None`` elsewhere (see the module docstring for ready ones).
    strength: ``lambda >= 0``, a float or a schedule (step -> float).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`DampenOscillationsState`.

  References:
    Nagel, Fournarakis, Bondarenko, Blankevoort, `Overcoming Oscillations in
    Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.
  """
  _checks.check_callable("centers_fn", centers_fn, "a function params -> centres")
  _check_strength(strength)
  strength_fn = strength if callable(strength) else (lambda count: strength)

  def init_fn(params):
    quantized_centers(centers_fn, params, "dampen_oscillations")
    return DampenOscillationsState(dampening_count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "dampen_oscillations pulls the params towards their bin centres, so it"
          " needs them: call tx.update(updates, state, params).")
    lam = jnp.asarray(strength_fn(state.dampening_count), jnp.float32)
    lam = jnp.where(lam > 0, lam, 0.0)  # negative or NaN: no pull
    param_leaves, centers, treedef = quantized_centers(
        centers_fn, params, "dampen_oscillations")
    update_leaves = treedef.flatten_up_to(updates)

    def add(g, p, c):
      if c is None or _tree.is_none_or_masked(g):
        return g
      p = _tree.unbox(p)
      # In at least float32: a bfloat16 w - c near a transition point is a
      # few ulps of w.
      compute = jnp.promote_types(jnp.promote_types(g.dtype, p.dtype), jnp.float32)
      pull = 2.0 * lam.astype(compute) * (
          p.astype(compute) - jax.lax.stop_gradient(c).astype(compute))
      return (g.astype(compute) + pull).astype(g.dtype)

    new = [add(g, p, c) for g, p, c in zip(update_leaves, param_leaves, centers)]
    return treedef.unflatten(new), DampenOscillationsState(
        dampening_count=optax.safe_increment(state.dampening_count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
