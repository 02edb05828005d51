"""``talr_optax.nnx``'s model helpers given a Qwix model: a clear pointer to ``talr_optax.qwix``.

``layer_axes_for``, ``levels_fn_for`` and ``param_labels`` read the library's
own ``QuantConv``/``QuantLinear`` layers. Qwix quantizes plain Flax layers, so
on a Qwix model they would see no quantized and no stacked weight and answer
``None`` / ``'full_precision'`` everywhere; they refuse such a model instead
and name the Qwix levels function that knows.
"""

import pytest

qwix = pytest.importorskip("qwix")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import talr_optax.nnx as tnnx  # noqa: E402
import talr_optax.qwix as tq  # noqa: E402
from _qwix_models import LAYERS, X, Stacked, params, qt  # noqa: E402

RULES = [qwix.QtRule(module_path="blocks/(q|mlp)", weight_qtype="int2")]


@pytest.fixture(scope="module")
def qt_model():
  return qt(Stacked(rngs=nnx.Rngs(0)), RULES, X)


@pytest.mark.parametrize("helper, advice", [
    (tnnx.layer_axes_for, r"layer_axes=levels_fn\.layer_axes"),
    (tnnx.levels_fn_for, r"levels_fn_from_qwix\(qt_model, x\)"),
    (tnnx.param_labels, r"returns None for the weights Qwix does not quantize"),
])
def test_helpers_refuse_a_qwix_model_and_say_what_to_use(qt_model, helper, advice):
  with pytest.raises(TypeError, match=f"(?s){helper.__name__}: model was quantized by "
                                      f"qwix.quantize_model.*{advice}"):
    helper(qt_model)


def test_the_suggested_layer_axes_are_right(qt_model):
  # What the error points to: the stacked kernels Qwix quantizes (q and mlp of
  # the LAYERS blocks, layers on axis 0) get axis 0, everything else None.
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  axes = levels_fn.layer_axes(params(qt_model))
  flat = {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(axes)}
  assert {k for k, v in flat.items() if v is not None} == {
      "blocks/q/kernel", "blocks/mlp/kernel"}
  assert flat["blocks/q/kernel"] == flat["blocks/mlp/kernel"] == 0
  assert params(qt_model)["blocks"]["q"]["kernel"].shape[0] == LAYERS


def test_a_plain_flax_model_is_not_mistaken_for_a_qwix_model():
  # Qwix is imported here, so the check runs; the unquantized model has no
  # quantized layer of either kind and is answered as before.
  model = Stacked(rngs=nnx.Rngs(0))
  axes = jax.tree.leaves(tnnx.layer_axes_for(model), is_leaf=lambda x: x is None)
  assert axes == [None] * len(jax.tree.leaves(params(model)))
