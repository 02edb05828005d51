"""An independent NumPy reference of TALR in the authors' order (float64).

Written from the method's equations, not from the library's code path. It is
driven by the parameter trajectory of the run under test (teacher forcing):
given the params before and after each update, it counts the level changes
itself and runs the recursion

    u_n = -U_n g_n,  k_n = mean(levels(p_(n+1)) != levels(p_n)),
    K_(n+1) = m K_n + (1 - m) k_n,
    c_(n+1) = m c_n + (1 - m) c_n R(n+1) / (K_(n+1) + 1e-8),  U_(n+1) = lr c_(n+1)
    (additive: U_(n+1) = max(0, U_n + eta (R(n+1) - K_(n+1))))

with U_0 = lr, K_0 = R(0), c_0 = 1, over rate groups: each tensor, each slice
of a stacked tensor along its layer axis, or all weights pooled.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np


def levels(w: np.ndarray, scale: float, bits: int) -> np.ndarray:
  """The paper's weight levels in NumPy (round half to even, like torch.round)."""
  w = np.asarray(w, np.float64)
  if bits == 1:
    return (w > 0).astype(np.int64)
  half = 2 ** (bits - 1)
  return np.round(np.clip(half * w / scale, -half, half - 1)).astype(np.int64)


def _groups(x: np.ndarray, axis: Optional[int]) -> list[np.ndarray]:
  """The rate groups of one tensor: itself, or its slices along ``axis``."""
  if axis is None:
    return [x.reshape(-1)]
  return [np.take(x, i, axis=axis).reshape(-1) for i in range(x.shape[axis])]


class ReferenceTALR:
  """TALR over a list of tensors, one rate per group (or one pooled rate)."""

  def __init__(self, scales: Sequence[float], bits: int, target: Callable[[int], float],
               lr: float, *, rule: str = "multiplicative", momentum: float = 0.99,
               eta: Optional[float] = None, global_rate: bool = False,
               layer_axes: Optional[Sequence[Optional[int]]] = None):
    self.scales, self.bits, self.target, self.lr = list(scales), bits, target, lr
    self.rule, self.m = rule, momentum
    self.eta = lr if eta is None else eta
    self.global_rate = global_rate
    self.axes = list(layer_axes) if layer_axes is not None else [None] * len(self.scales)
    self.n = 0
    self.U = self.K = self.c = self.k = None

  def _start(self, num_groups: int) -> None:
    n = 1 if self.global_rate else num_groups
    self.K = np.full(n, float(self.target(0)))
    self.U = np.full(n, float(self.lr))
    self.c = np.ones(n)
    self.k = np.zeros(n)

  def rates_per_tensor(self, params: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``U`` for each tensor, shaped to broadcast (per layer along its axis)."""
    out, offset = [], 0
    for p, axis in zip(params, self.axes):
      if self.global_rate:
        out.append(np.float64(self.U[0]))
        continue
      count = 1 if axis is None else p.shape[axis]
      u = self.U[offset:offset + count]
      offset += count
      if axis is None:
        out.append(np.float64(u[0]))
      else:
        shape = [1] * p.ndim
        shape[axis] = count
        out.append(u.reshape(shape))
    return out

  def updates(self, params: Sequence[np.ndarray], directions: Sequence[np.ndarray]
              ) -> list[np.ndarray]:
    """``-U_n g_n`` for each tensor (``U_n`` from earlier updates only)."""
    if self.U is None:
      self._start(sum(len(_groups(np.asarray(p), a)) for p, a in zip(params, self.axes)))
    return [-u * np.asarray(g, np.float64)
            for u, g in zip(self.rates_per_tensor(params), directions)]

  def observe(self, before: Sequence[np.ndarray], after: Sequence[np.ndarray]) -> None:
    """Counts the transitions from ``before`` to ``after`` and adapts ``U``."""
    changed, sizes = [], []
    for b, a, s, axis in zip(before, after, self.scales, self.axes):
      for gb, ga in zip(_groups(levels(b, s, self.bits), axis),
                        _groups(levels(a, s, self.bits), axis)):
        changed.append(float(np.sum(gb != ga)))
        sizes.append(float(gb.size))
    changed, sizes = np.array(changed), np.array(sizes)
    k = np.array([changed.sum() / sizes.sum()]) if self.global_rate else changed / sizes
    self.n += 1
    R = float(self.target(self.n))
    K = self.m * self.K + (1 - self.m) * k
    if self.rule == "additive":
      U, c = np.maximum(0.0, self.U + self.eta * (R - K)), self.c
    else:
      c = self.m * self.c + (1 - self.m) * self.c * R / (K + 1e-8)
      U = self.lr * c
    self.k, self.K, self.U, self.c = k, K, U, c
