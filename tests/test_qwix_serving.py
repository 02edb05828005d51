"""The serving recipe of ``docs/qwix.md``, run as written: Qwix's PTQ gives the integers TALR counted."""

import pathlib
import re

import pytest

qwix = pytest.importorskip("qwix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import talr_optax  # noqa: E402
import talr_optax.qwix as tq  # noqa: E402
from talr_optax import nnx as tnnx  # noqa: E402
from _qwix_models import LAYERS, X, Stacked, sgd_steps  # noqa: E402

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "qwix.md"
WEIGHTS = ("blocks/q/kernel", "blocks/k/kernel", "blocks/mlp/kernel", "head/kernel")


def _recipe_blocks():
  """The two python blocks of the doc's "Serving" section."""
  text = DOC.read_text()
  section = text[text.index("## Serving"):]
  section = section[:section.index("\n## ", 1)]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 2
  return blocks


def _leaf(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


@pytest.fixture(scope="module")
def trained():
  """A stacked model (int4 blocks, int2 head) after 5 SGDT steps with frozen rules."""
  model = Stacked(rngs=nnx.Rngs(0))
  rules = [qwix.QtRule(module_path="blocks/.*", weight_qtype="int4"),
           qwix.QtRule(module_path="head", weight_qtype="int2")]
  rules = tq.frozen_scale_rules(model, rules, X)
  qt_model = qwix.quantize_model(model, qwix.QtProvider(rules), X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  tx = talr_optax.sgdt(0.5, 0.01, levels_fn, layer_axes=levels_fn.layer_axes)
  start = levels_fn(nnx.as_pure(nnx.state(qt_model, nnx.Param)))
  sgd_steps(qt_model, steps=5, optimizer=nnx.Optimizer(qt_model, tx, wrt=nnx.Param))
  levels = levels_fn(nnx.as_pure(nnx.state(qt_model, nnx.Param)))
  # Training moved some levels, so the check below is not about initial weights.
  assert any(bool(jnp.any(_leaf(levels, p) != _leaf(start, p))) for p in WEIGHTS)
  return model, rules, qt_model, levels


def _check_served(ptq_model, qt_model, levels):
  served = nnx.to_pure_dict(nnx.state(ptq_model, nnx.Param))
  for path in WEIGHTS:
    array = _leaf(served, path)["array"]
    assert jnp.issubdtype(array["qvalue"].dtype, jnp.integer)
    if path.startswith("blocks/"):
      assert array["qvalue"].shape[0] == LAYERS and array["scale"].shape[0] == LAYERS
    np.testing.assert_array_equal(np.asarray(array["qvalue"]).astype(np.int8),
                                  np.asarray(_leaf(levels, path)))
  expected = qt_model(X)
  got = ptq_model(X)
  assert float(jnp.max(jnp.abs(got - expected))) <= 1e-5 * float(jnp.max(jnp.abs(expected)))


def test_ptq_recipe_gives_the_levels_talr_counted(trained):
  model, rules, qt_model, levels = trained
  namespace = dict(nnx=nnx, qwix=qwix, model=nnx.clone(model), rules=rules,
                   qt_model=qt_model, x=X)
  exec(_recipe_blocks()[0], namespace)  # pylint: disable=exec-used
  _check_served(namespace["ptq_model"], qt_model, levels)
  np.testing.assert_array_equal(namespace["y"], namespace["ptq_model"](X))


def test_quantize_params_recipe(trained):
  model, rules, qt_model, levels = trained
  namespace = dict(nnx=nnx, qwix=qwix, jax=jax, jnp=jnp, rules=rules, qt_model=qt_model, x=X,
                   fresh_model=Stacked(rngs=nnx.Rngs(5)))
  exec(_recipe_blocks()[1], namespace)  # pylint: disable=exec-used
  _check_served(namespace["ptq_model"], qt_model, levels)


def test_quantize_params_without_broadcast_fails_as_documented(trained):
  """Why the recipe broadcasts: Qwix's quantize_params gives a stacked weight one scale."""
  _, rules, qt_model, _ = trained
  ptq_model = qwix.quantize_model(Stacked(rngs=nnx.Rngs(5)), qwix.PtqProvider(rules), X)
  quantized = qwix.quantize_params(nnx.to_pure_dict(nnx.state(qt_model, nnx.Param)), ptq_model)
  assert _leaf(quantized, "blocks/q/kernel")["array"]["scale"].shape == (1, 1, 1)
  nnx.update(ptq_model, quantized)
  with pytest.raises(ValueError, match="different leading axis sizes"):
    ptq_model(X)


def test_not_a_qat_model_is_refused(trained):
  model, rules, qt_model, _ = trained
  ptq_model = qwix.quantize_model(nnx.clone(model), qwix.PtqProvider(rules), X)
  with pytest.raises(ValueError, match="post-training quantized model"):
    tq.levels_fn_from_qwix(ptq_model, X)
  for qwix_model in (qt_model, ptq_model):
    with pytest.raises(ValueError, match="is a Qwix model.*PtqProvider"):
      tnnx.export_integer_model(qwix_model)
