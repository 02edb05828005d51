"""Tests of talr_optax.schedules against the closed forms of the paper's target schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from talr_optax import schedules


def _closed_form(t, r0, total, final=0.0):
  """R_t = final + 0.5 (R_0 - final) (1 + cos(pi min(t, T) / T)), in float64."""
  t = min(t, total)
  return final + 0.5 * (r0 - final) * (1.0 + math.cos(math.pi * t / total))


def test_initial_target():
  assert schedules.initial_target(2) == pytest.approx(5e-3 * math.sqrt(2), rel=1e-15)
  assert schedules.initial_target(2) == pytest.approx(7.0710678e-3, rel=1e-7)
  assert schedules.initial_target(1) == pytest.approx(5e-3, rel=1e-15)
  assert schedules.initial_target(4) == pytest.approx(1e-2, rel=1e-15)
  assert schedules.initial_target(8, lam=0.01) == pytest.approx(0.01 * math.sqrt(8), rel=1e-15)
  assert isinstance(schedules.initial_target(3), float)


@pytest.mark.parametrize("bits", [0, 9, 2.0, True, "2"], ids=repr)
def test_initial_target_bad_bits(bits):
  with pytest.raises(ValueError, match=r"bits.*\[1, 8\]"):
    schedules.initial_target(bits)


@pytest.mark.parametrize("lam", [0.0, -1e-3, 1.5, True, "0.005", float("nan")], ids=repr)
def test_initial_target_bad_lam(lam):
  with pytest.raises(ValueError, match="lam"):
    schedules.initial_target(2, lam=lam)


def test_initial_target_not_a_rate():
  # 0.5 * sqrt(8) > 1: not a rate.
  with pytest.raises(ValueError, match="lam"):
    schedules.initial_target(8, lam=0.5)


T = 100
STEPS = [0, 1, 10, 25, 50, 75, 90, 99, 100, 101, 150, 10_000]


@pytest.mark.parametrize("final", [0.0, 1e-3])
def test_cosine_target_values(final):
  r0 = schedules.initial_target(2)
  sched = schedules.cosine_target(r0, T, final_rate=final)
  got = np.asarray([float(sched(jnp.asarray(t))) for t in STEPS])
  want = np.asarray([_closed_form(t, r0, T, final) for t in STEPS])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-10)
  # Landmarks written out by hand.
  assert float(sched(0)) == pytest.approx(r0, rel=1e-6)
  assert float(sched(T // 2)) == pytest.approx(0.5 * (r0 + final), rel=1e-6)
  assert float(sched(T)) == pytest.approx(final, abs=1e-10)
  assert float(sched(3 * T)) == pytest.approx(final, abs=1e-10)
  # Monotone non-increasing.
  dense = np.asarray(jax.vmap(sched)(jnp.arange(0, 2 * T)))
  assert np.all(np.diff(dense) <= 1e-9)


def test_cosine_target_constant_when_final_equals_init():
  sched = schedules.cosine_target(0.01, 10, final_rate=0.01)
  np.testing.assert_allclose(np.asarray(jax.vmap(sched)(jnp.arange(20))), 0.01, rtol=1e-6)


def test_cosine_target_under_jit_with_traced_count():
  r0 = 0.02
  sched = schedules.cosine_target(r0, T, final_rate=0.002)
  f = jax.jit(sched)
  for t in (0, 33, 50, 100, 500):
    np.testing.assert_allclose(float(f(jnp.asarray(t, jnp.int32))),
                               _closed_form(t, r0, T, 0.002), rtol=2e-6)
  counts = jnp.asarray(STEPS, jnp.int32)
  np.testing.assert_allclose(
      np.asarray(jax.jit(jax.vmap(sched))(counts)),
      [_closed_form(t, r0, T, 0.002) for t in STEPS], rtol=2e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(init_rate=0.0, total_steps=10), "init_rate"),
        (dict(init_rate=-0.1, total_steps=10), "init_rate"),
        (dict(init_rate=1.5, total_steps=10), "init_rate"),
        (dict(init_rate=True, total_steps=10), "init_rate"),
        (dict(init_rate="0.01", total_steps=10), "init_rate"),
        (dict(init_rate=float("nan"), total_steps=10), "init_rate"),
        (dict(init_rate=0.01, total_steps=-5), "total_steps"),
        (dict(init_rate=0.01, total_steps=0), "total_steps"),
        (dict(init_rate=0.01, total_steps=10.0), "total_steps"),
        (dict(init_rate=0.01, total_steps=True), "total_steps"),
        (dict(init_rate=0.01, total_steps=10, final_rate=0.02), "final_rate"),
        (dict(init_rate=0.01, total_steps=10, final_rate=-1e-3), "final_rate"),
        (dict(init_rate=0.01, total_steps=10, final_rate="0"), "final_rate"),
        (dict(init_rate=0.01, total_steps=10, final_rate=float("nan")), "final_rate"),
    ],
)
def test_cosine_target_bad_args(kwargs, name):
  with pytest.raises(ValueError, match=name):
    schedules.cosine_target(**kwargs)


def test_numpy_scalars_accepted():
  assert schedules.initial_target(np.int64(2)) == pytest.approx(5e-3 * math.sqrt(2), rel=1e-15)
  sched = schedules.cosine_target(np.float32(0.02), np.int64(T), final_rate=np.float64(0.0))
  for t in (0, 50, 100):
    np.testing.assert_allclose(float(sched(t)), _closed_form(t, 0.02, T), rtol=2e-6, atol=1e-10)


# The EMA momentum rule: m = 1 - 1/h, h = T / 50 clipped to [10, 100]; written out by hand.
@pytest.mark.parametrize("steps, want", [
    (1, 0.9), (100, 0.9), (500, 0.9), (600, 1 - 1 / 12), (1000, 0.95),
    (2000, 0.975), (4000, 0.9875), (5000, 0.99), (450_000, 0.99)])
def test_ema_momentum_for(steps, want):
  assert schedules.ema_momentum_for(steps) == pytest.approx(want, abs=1e-12)
  assert isinstance(schedules.ema_momentum_for(steps), float)


@pytest.mark.parametrize("steps", [0, -1, 10.0, True, "1000", None], ids=repr)
def test_ema_momentum_for_bad_steps(steps):
  with pytest.raises(ValueError, match="total_steps"):
    schedules.ema_momentum_for(steps)


def test_cosine_target_records_its_length():
  sched = schedules.cosine_target(0.01, 1234)
  assert isinstance(sched, schedules.TargetSchedule) and sched.total_steps == 1234
  assert schedules.resolve_ema_momentum(None, sched) == pytest.approx(1 - 1 / (1234 / 50))
  # Given values win; a float target or a plain schedule has no length: the paper's 0.99.
  assert schedules.resolve_ema_momentum(0.9, sched) == 0.9
  assert schedules.resolve_ema_momentum(None, 0.01) == 0.99
  assert schedules.resolve_ema_momentum(None, lambda count: 0.01) == 0.99
