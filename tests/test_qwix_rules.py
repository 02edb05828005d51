"""Tests of ``talr_optax.qwix.frozen_scale_rules``: Qwix rules with the paper's quantizer."""

import dataclasses

import pytest

qwix = pytest.importorskip("qwix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from talr_optax import quantizers  # noqa: E402
import talr_optax.qwix as tq  # noqa: E402
from _qwix_models import (  # noqa: E402
    LAYERS, X, LinenMLP, Stacked, TwoKernels, forward_levels, mlp, params, qt, sgd_steps)


def test_frozen_rules_reproduce_paper_quantizer_after_training():
  model = mlp()
  rules = [qwix.QtRule(module_path="fc2", weight_qtype="int2"),
           qwix.QtRule(module_path="fc1", weight_qtype=jnp.int4)]
  frozen = tq.frozen_scale_rules(model, rules)
  bits = {"fc1": 4, "fc2": 2}
  steps = {}
  for rule in frozen[:2]:
    name = rule.module_path.strip("^$")
    steps[name] = tq.frozen_step_size(rule)
    w0 = getattr(model, name).kernel.get_value()
    assert steps[name] == pytest.approx(3.0 * float(jnp.std(w0)), rel=2.0 ** -(23 - bits[name]))
  assert frozen[2:] == rules

  qt_model = qt(model, frozen, X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  optimizer = None
  for _ in range(3):
    optimizer = sgd_steps(qt_model, steps=2, optimizer=optimizer)
    forward = forward_levels(qt_model, X)
    levels = jax.jit(levels_fn)(params(qt_model))
    for name, b in bits.items():
      w = getattr(qt_model, name).kernel.get_value()
      paper = quantizers.weight_levels(w, steps[name], b)
      np.testing.assert_array_equal(forward[f"{name}/kernel"], paper)
      np.testing.assert_array_equal(levels[name]["kernel"], paper)


def test_frozen_rules_agree_with_paper_on_transition_points():
  model = mlp()
  frozen = tq.frozen_scale_rules(model, [qwix.QtRule(module_path="fc2", weight_qtype="int2")])
  s = tq.frozen_step_size(frozen[0])
  qt_model = qt(model, frozen, X)
  # Weights exactly on the transition points of u = 2 w / s and one ulp away.
  points = np.array([-1.5, -0.5, 0.5, -2.5, 1.5], np.float32) * np.float32(s / 2)
  values = np.concatenate([points, np.nextafter(points, np.inf), np.nextafter(points, -np.inf)])
  kernel = np.resize(values, qt_model.fc2.kernel.get_value().shape).astype(np.float32)
  qt_model.fc2.kernel.set_value(jnp.asarray(kernel))
  np.testing.assert_array_equal(
      forward_levels(qt_model, X)["fc2/kernel"], quantizers.weight_levels(kernel, s, 2))


def test_frozen_rules_keep_everything_else():
  model = mlp()
  rules = [
      qwix.QtRule(module_path="fc2", op_names=("dot_general",), weight_qtype="int2",
                  act_qtype=jnp.int8, tile_size=8, bwd_qtype=jnp.int8),
      qwix.QtRule(module_path="fc3", act_qtype=jnp.int8),
      qwix.QtRule(module_path="fc.*", weight_qtype=jnp.int4),
  ]
  frozen = tq.frozen_scale_rules(model, rules)
  assert frozen[-3:] == rules
  per_layer = {r.module_path: [] for r in frozen[:-3]}
  for r in frozen[:-3]:
    per_layer[r.module_path].append(r)
  assert set(per_layer) == {"^fc1$", "^fc2$", "^fc3$"}
  fc2_first, fc2_second = per_layer["^fc2$"]
  restored = dataclasses.replace(fc2_first, module_path="fc2", weight_calibration_method="absmax")
  assert restored == rules[0]
  assert fc2_first.weight_calibration_method.startswith("fixed,-")
  assert fc2_second.weight_qtype == jnp.int4
  # The activation-only rule keeps its precedence in fc3 and is not frozen.
  assert per_layer["^fc3$"][0] == dataclasses.replace(rules[1], module_path="^fc3$")
  assert per_layer["^fc3$"][1].weight_calibration_method.startswith("fixed,-")


def test_frozen_rules_errors_and_example_inputs():
  model = mlp()
  for bad in (0.0, -1.0, float("nan"), True, "3"):
    with pytest.raises(ValueError, match="num_std"):
      tq.frozen_scale_rules(model, [qwix.QtRule(weight_qtype="int2")], num_std=bad)
  with pytest.raises(ValueError, match="signed integer"):
    tq.frozen_scale_rules(model, [qwix.QtRule(weight_qtype=jnp.float8_e4m3fn)])
  with pytest.raises(ValueError, match="symmetric fixed"):
    tq.frozen_step_size(qwix.QtRule(weight_qtype="int2"))
  with pytest.raises(TypeError, match="nnx.Module"):
    tq.frozen_scale_rules([1, 2], [qwix.QtRule(weight_qtype="int2")])
  # Rules that freeze nothing are a mistake (a typo in module_path, or no
  # weight_qtype), not a no-op.
  with pytest.raises(ValueError, match=r"No rule with a weight_qtype matches.*'fc1'"):
    tq.frozen_scale_rules(model, [qwix.QtRule(module_path="dense1", weight_qtype="int2")])
  with pytest.raises(ValueError, match="No rule with a weight_qtype"):
    tq.frozen_scale_rules(model, [qwix.QtRule(module_path="fc1", act_qtype=jnp.int8)])

  two = TwoKernels(rngs=nnx.Rngs(0))
  rules = [qwix.QtRule(module_path=".*", weight_qtype="int2")]
  with pytest.raises(ValueError, match=r"several weights \(a, b\)"):
    tq.frozen_scale_rules(two, rules)
  # With example inputs only the weight Qwix quantizes (a) sets the range.
  frozen = tq.frozen_scale_rules(two, rules, X)
  s = tq.frozen_step_size(frozen[0])
  assert s == pytest.approx(3.0 * float(jnp.std(two.a.get_value())), rel=1e-6)


def test_frozen_rules_for_stacked_layers_share_one_step_per_weight():
  """Qwix cannot give each layer slice its own fixed range; each stacked
  weight gets one frozen step from all its layers, and every layer's levels
  are the paper's quantizer with that step, in Qwix's forward pass too."""
  model = Stacked(rngs=nnx.Rngs(0))
  rules = [qwix.QtRule(module_path="blocks/(q|mlp)", weight_qtype="int2"),
           qwix.QtRule(module_path="head", weight_qtype=jnp.int4)]
  frozen = tq.frozen_scale_rules(model, rules, X)
  by_module = {r.module_path.strip("^$"): r for r in frozen[:-2]}
  assert set(by_module) == {"blocks/q", "blocks/mlp", "head"}
  steps = {name: tq.frozen_step_size(rule) for name, rule in by_module.items()}
  for name in ("blocks/q", "blocks/mlp"):
    w = getattr(model.blocks, name.split("/")[1]).kernel.get_value()
    assert w.shape == (LAYERS, 16, 16)
    assert steps[name] == pytest.approx(3.0 * float(jnp.std(w)), rel=2.0 ** -21)
  # Without example inputs the same weights are found (the stacked kernel,
  # not the stacked bias, which has 2 dimensions too).
  by_path = lambda rs: sorted(rs[:-2], key=lambda r: r.module_path)
  assert by_path(tq.frozen_scale_rules(model, rules)) == by_path(frozen)

  qt_model = qt(model, frozen, X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  sgd_steps(qt_model, steps=2)
  forward = forward_levels(qt_model, X)
  levels = jax.jit(levels_fn)(params(qt_model))
  for name in ("blocks/q", "blocks/mlp"):
    kind = name.split("/")[1]
    w = getattr(qt_model.blocks, kind).kernel.get_value()
    for layer in range(LAYERS):
      paper = quantizers.weight_levels(w[layer], steps[name], 2)
      np.testing.assert_array_equal(forward[f"{name}/kernel"][layer], paper)
      np.testing.assert_array_equal(levels["blocks"][kind]["kernel"][layer], paper)
  np.testing.assert_array_equal(
      levels["head"]["kernel"],
      quantizers.weight_levels(qt_model.head.kernel.get_value(), steps["head"], 4))


def test_linen_frozen_rules_accept_variables_or_params():
  rules = [qwix.QtRule(module_path="hidden", weight_qtype="int2")]
  variables = qwix.quantize_model(LinenMLP(), qwix.QtProvider(rules)).init(jax.random.key(0), X)
  frozen = tq.frozen_scale_rules(variables["params"], rules)
  assert [r.module_path for r in frozen[:-1]] == ["^hidden$"]
  # The whole variables (paths "params/hidden/...") give the same rules
  # instead of matching nothing.
  assert tq.frozen_scale_rules(variables, rules) == frozen
  with pytest.raises(ValueError, match="only used with NNX"):
    tq.frozen_scale_rules(variables, rules, X)

  s = tq.frozen_step_size(frozen[0])
  w = variables["params"]["hidden"]["kernel"].unbox()
  frozen_model = qwix.quantize_model(LinenMLP(), qwix.QtProvider(frozen))
  levels = tq.levels_fn_from_qwix(frozen_model, X, variables=variables)(variables["params"])
  np.testing.assert_array_equal(levels["hidden"]["kernel"], quantizers.weight_levels(w, s, 2))
