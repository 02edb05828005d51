"""The README's Flax NNX snippet runs as written: every name it uses is defined in it."""

import re
from pathlib import Path

import pytest

pytest.importorskip("flax")

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import talr_optax as talr  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(section: str) -> list[str]:
  """The ```python blocks of the README section headed ``## <section>``."""
  text = README.read_text()
  body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_nnx_snippet_runs_in_an_empty_namespace_and_trains():
  (snippet,) = _python_blocks("Flax NNX")
  namespace: dict = {}
  exec(compile(snippet, str(README), "exec"), namespace)  # pylint: disable=exec-used
  model, optimizer = namespace["model"], namespace["optimizer"]
  x = namespace["first_batch"]
  y = jax.numpy.arange(x.shape[0]) % 10

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    optimizer.update(model, nnx.grad(loss)(model))

  step(model, optimizer)
  m = talr.metrics(optimizer)
  # The two quantized convs of SmallCNN have a rate each, measured on this update.
  assert {k for k in m if k.startswith("talr/")} == {"talr/conv2/kernel", "talr/conv3/kernel"}
  for conv in ("conv2", "conv3"):
    assert 0 <= float(m[f"transition_rate/{conv}/kernel"]) <= 1
    assert 0 < float(m[f"talr/{conv}/kernel"]) < float("inf")
