"""Code and numbers in the docs that no example run checks: the code runs as
written, and numbers said to come from a committed results file are in it."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import talr_optax as talr

ROOT = Path(__file__).resolve().parents[1]


def _code_block(doc: str, marker: str) -> str:
  """The one fenced code block of ``doc`` that contains ``marker``."""
  blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (ROOT / doc).read_text(), flags=re.S | re.M)
  (block,) = [b for b in blocks if marker in b]
  return block


def test_method_cap_on_u_runs_as_written_and_bounds_u():
  """docs/method.md's ``cap_talr``: U stops at the cap, c follows it, and the
  same steps without the cap take U far above it."""
  params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "b": jnp.zeros(8)}
  levels_fn = talr.levels_fn_from_scales({"w": 1.0, "b": None}, bits=2)
  target = talr.cosine_target(talr.initial_target(2), 200)
  namespace = {"target": target, "levels_fn": levels_fn}
  exec(compile(_code_block("docs/method.md", "def cap_talr"), "docs/method.md", "exec"),
       namespace)  # pylint: disable=exec-used
  capped = namespace["tx"]
  plain = optax.chain(optax.trace(0.9), talr.scale_by_talr(
      target, levels_fn, learning_rate=0.05, fallback_learning_rate=0.05))
  # A tiny gradient moves no weight across a point: K falls and U rises.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-6), params)

  def run(tx):
    p, state = params, tx.init(params)
    for _ in range(60):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return state[1]

  assert float(run(plain).talr[0]) > 5.0
  state = run(capped)
  assert float(state.talr[0]) == pytest.approx(0.5)
  assert float(state.talr_scale[0]) == pytest.approx(0.5 / 0.05)
  assert float(talr.metrics(state)["talr/w"]) == pytest.approx(0.5)
