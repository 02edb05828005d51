"""Oscillation dampening (Nagel et al., 2022) as an Optax stage.

A latent weight that oscillates sits near a transition point, between two
levels. Dampening adds the regulariser ``lambda(t) * sum (w - center(w))**2``,
with ``center(w)`` the latent value of w's current level held constant,
which pulls every weight towards the centre of its bin, away from the
transition points. :func:`dampen_oscillations` adds its gradient,
``2 lambda(t) (w - center(w))``, to the updates before the optimizer's
scaling, as ``optax.add_decayed_weights`` adds weight decay.

The authors' default units (``aggregation="kernel_mean"``) divide each
kernel's term by its fan-in, so that one ``lambda`` suits layers of every
width; ``"sum"`` and ``"mean"`` are their other two choices.

The centres come from a ``centers_fn(params)``:
:func:`talr_optax.centers_fn_from_scales` for plain params,
:func:`talr_optax.nnx.centers_fn_for` for the NNX layers and
``levels_fn.centers`` of :func:`talr_optax.qwix.levels_fn_from_qwix` for
Qwix models.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from talr_optax import _checks
from talr_optax import _layout
from talr_optax import _stage
from talr_optax import _tree

__all__ = ["CentersFn", "DampenOscillationsState", "dampen_oscillations"]

CentersFn = Callable[..., Any]
_OWNER = "dampen_oscillations"
_AGGREGATIONS = ("sum", "mean", "kernel_mean")


@_stage.declare_state()
class DampenOscillationsState(NamedTuple):
  """State of :func:`dampen_oscillations`.

  Attributes:
    dampening_count: number of updates done (int32), the step of a
      ``strength`` schedule.
  """

  dampening_count: jax.Array


def dampen_oscillations(centers_fn: CentersFn, strength: optax.ScalarOrSchedule, *,
                        aggregation: str = "sum", layer_axes: Any = None
                        ) -> optax.GradientTransformationExtraArgs:
  r"""Adds the gradient of the oscillation-dampening regulariser to the updates.

  .. math::

    g_n \leftarrow g_n + 2 \lambda(n) \, a_w \, (w_n - \operatorname{sg}(c(w_n)))

  on quantized leaves (others pass unchanged), which is the gradient of
  ``lambda(n) * sum_w a_w (w - stop_gradient(c(w)))**2`` added to the loss,
  with the factor ``a_w`` of ``aggregation``, as in the reference code:

  * ``"sum"``: ``a_w = 1``, the term summed over all weights;
  * ``"mean"``: the mean over each tensor (``a_w = 1 / size``);
  * ``"kernel_mean"`` (the reference code's default): summed over the output
    axis and averaged over the others, i.e. ``a_w = 1 / fan-in`` with the
    fan-in the size over every axis but the last (Flax kernels are
    ``(..., in, out)``; PyTorch's ``(out, in, ...)`` sum over their first).

  ``"mean"`` and ``"kernel_mean"`` take each layer of a stacked kernel
  (``layer_axes``) as its own tensor: its layer axis counts neither as
  output nor in the mean.

  Put the stage before the optimizer's scaling, e.g. ``optax.chain(
  dampen_oscillations(centers_fn, 1e-2), optax.adamw(1e-3))``, or before
  ``scale_by_adam`` in a chain with :func:`talr_optax.scale_by_talr`.
  Nagel et al. raise ``lambda`` from 0 with a cosine after a quarter of
  training: ``delayed_cosine_schedule(0.0, lam, total_steps)``. They clip
  ``w`` to the quantizer's range in the term, so a weight beyond the outer
  levels feels no pull; the centres functions of this library give such a
  weight itself as its centre.

  Under ``optax.inject_hyperparams`` pass ``static_args=("centers_fn",
  "layer_axes")`` (those given): it treats callables as schedules.

  Safe behaviour: a schedule's negative or NaN value counts as 0 at that
  step (a schedule cannot raise under jit).

  Args:
    centers_fn: ``params -> centres``, a pytree with the structure of params
      holding the latent value of each quantized weight's current level and
      ``None`` elsewhere (see the module docstring for ready ones).
    strength: ``lambda >= 0``, a float or a schedule (step -> float).
    aggregation: ``"sum"``, ``"mean"`` or ``"kernel_mean"`` (see above).
    layer_axes: as in :func:`talr_optax.scale_by_talr`, for ``"mean"`` and
      ``"kernel_mean"`` over stacked kernels.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`DampenOscillationsState`.

  References:
    Nagel, Fournarakis, Bondarenko, Blankevoort, `Overcoming Oscillations in
    Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.
  """
  callables = ("centers_fn", "layer_axes") if callable(layer_axes) else ("centers_fn",)
  _stage.check_centers_fn(centers_fn, owner=_OWNER, callables=callables, with_levels=False)
  strength_fn = _stage.schedule("strength", strength, 0.0, float("inf"), high_open=True,
                                what="a coefficient", owner=_OWNER)
  _checks.check_choice("aggregation", aggregation, _AGGREGATIONS, owner=_OWNER)
  if layer_axes is not None and aggregation == "sum":
    raise ValueError(
        f"{_OWNER}: layer_axes sets the tensors that aggregation='mean' or 'kernel_mean'"
        " average over; with aggregation='sum' it would be ignored. Drop it, or pass"
        " aggregation='kernel_mean'.")
  prologue = _stage.Prologue(_OWNER, DampenOscillationsState)

  def factors(params: Any) -> tuple[Any, list[Any], list[Any], list[float]]:
    treedef, param_leaves, centers = _stage.centers_of(centers_fn, params, _OWNER)
    axes = _layout.layer_axes_of(layer_axes, params, treedef)
    scale = [None if c is None else _factor(aggregation, c.shape, axis)
             for c, axis in zip(centers, axes)]
    return treedef, param_leaves, centers, scale

  def init_fn(params):
    prologue.init(params)
    factors(params)
    return DampenOscillationsState(dampening_count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    prologue.update(state, params, why="pulls the params towards their bin centres")
    lam = jnp.asarray(strength_fn(state.dampening_count), jnp.float32)
    lam = jnp.where(lam > 0, lam, 0.0)  # negative or NaN: no pull
    treedef, param_leaves, centers, scale = factors(params)

    def add(g, p, c, a):
      if c is None or _tree.is_none_or_masked(g):
        return g
      p = _tree.unbox(p)
      # In at least float32: a bfloat16 w - c near a transition point is a
      # few ulps of w.
      compute = jnp.promote_types(jnp.promote_types(g.dtype, p.dtype), jnp.float32)
      pull = (2.0 * a) * lam.astype(compute) * (
          p.astype(compute) - jax.lax.stop_gradient(c).astype(compute))
      return (g.astype(compute) + pull).astype(g.dtype)

    new = [add(g, p, c, a) for g, p, c, a in zip(
        treedef.flatten_up_to(updates), param_leaves, centers, scale)]
    return treedef.unflatten(new), DampenOscillationsState(
        dampening_count=optax.safe_increment(state.dampening_count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _factor(aggregation: str, shape: tuple[int, ...], layer_axis: Optional[int]) -> float:
  """``a_w`` of one tensor: 1, 1 / (weights per layer), or 1 / (fan-in per layer)."""
  if aggregation == "sum":
    return 1.0
  ndim = len(shape)
  axis = None if layer_axis is None else layer_axis % max(ndim, 1)
  kept = [d for i, d in enumerate(shape) if i != axis]
  if aggregation == "mean":
    return 1.0 / max(math.prod(kept), 1)
  out_axis = ndim - 1 if axis != ndim - 1 else ndim - 2  # the last axis that is not the layer's
  fan_in = math.prod(d for i, d in enumerate(shape) if i not in (axis, out_axis))
  return 1.0 / max(fan_in, 1)
