"""TALR with params sharded over 8 simulated CPU devices (a 2 x 4 mesh).

The device count is fixed when JAX initialises, so the runs happen in a
subprocess (``tests/_sharded_run.py``, and the shipped example); this process
keeps its single device. Update ``n`` counts the level changes between the
params before and after it; every comparison below uses that alignment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Cross-device reductions of counts, and the rate vectors' bookkeeping, are
# scalars or vectors of at most this many entries.
TINY = 32


def _run(*args: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def report():
  out = _run(str(ROOT / "tests" / "_sharded_run.py"))
  line = next(l for l in out.splitlines() if l.startswith("REPORT "))
  return json.loads(line[len("REPORT "):])


def test_runs_on_eight_devices(report):
  assert report["device_count"] == 8


@pytest.mark.parametrize("granularity", ["per_tensor", "global"])
def test_levels_have_the_sharding_of_their_params(report, granularity):
  r = report[granularity]
  assert r["levels_sharded_like_params_init"]  # eager tx.init
  assert r["levels_sharded_like_params_jit_init"]  # jax.jit(tx.init)
  assert r["levels_sharded_like_params_step"]  # after jitted updates
  assert r["levels_specs"] == r["params_specs"]
  # The layouts under test are really sharded, over one axis and over both.
  assert r["params_specs"]["w2"] == "P('data', 'model')"


@pytest.mark.parametrize("granularity, names", [("per_tensor", ["w1", "w2", "w3"]),
                                                ("global", [""])])
def test_sharded_run_equals_single_device_run(report, granularity, names):
  r = report[granularity]
  assert r["names"] == names and r["rate_shape"] == [len(names)]
  assert r["total_transitions"] > 50  # the runs do move weights across levels
  assert r["levels_equal"]
  assert r["max_abs_diff_k"] == 0.0
  assert r["max_abs_diff_U"] <= 1e-6
  assert r["max_abs_diff_K"] <= 1e-6
  assert r["max_abs_diff_params"] <= 1e-5


@pytest.mark.parametrize("granularity", ["per_tensor", "global"])
def test_transition_rate_is_the_exact_cross_device_count(report, granularity):
  # k of update n against the levels of params n and n + 1 gathered to the
  # host (global: the float32 mean of the pooled counts).
  r = report[granularity]
  assert r["k_host_shape"] == r["k_device_shape"]
  assert r["max_abs_diff_k_host"] <= (0.0 if granularity == "per_tensor" else 1e-8)


def test_rates_are_replicated(report):
  assert report["global"]["rate_is_replicated"]
  assert report["per_tensor"]["rate_is_replicated"]


def test_mesh_with_explicit_axes(report):
  r = report["explicit"]
  assert r["levels_sharded_like_params"]
  assert r["total_transitions"] > 0
  assert r["levels_equal"] and r["max_abs_diff_k"] == 0.0
  assert r["max_abs_diff_U"] <= 1e-6 and r["max_abs_diff_params"] <= 1e-5


def test_stacked_param_with_its_layer_axis_sharded(report):
  r = report["stacked"]
  assert r["params_spec"] == "P('model', None, 'data')"
  assert r["levels_spec"] == r["params_spec"]
  assert r["levels_sharded_like_params_init"] and r["levels_sharded_like_params_step"]
  assert r["names"] == [f"stack[{i}]" for i in range(4)] and r["rate_shape"] == [4]
  # Per-layer k, K and U of the sharded run equal the single-device run.
  assert r["levels_equal"] and r["max_abs_diff_k"] == 0.0
  assert r["max_abs_diff_K"] <= 1e-6 and r["max_abs_diff_U"] <= 1e-6
  assert r["max_abs_diff_params"] <= 1e-5
  # ...and are each layer's exact count.
  assert r["max_abs_diff_k_host"] == 0.0
  assert min(r["transitions_per_layer"]) > 0.05  # every layer moved


def test_sampled_rates_equal_the_single_device_sampled_run(report):
  r = report["sampled"]
  assert r["names"] == [f"stack[{i}]" for i in range(4)] + ["w1", "w2"]
  # Only the sampled levels are stored: the grid of sample_strides.
  # Strides divide the axes, so each device samples its own block.
  assert r["strides"] == {"w1": [8, 16], "w2": [32, 16], "stack": [1, 8, 4]}
  assert r["sampled_levels_shapes"] == {"w1": [8, 16], "w2": [8, 16], "stack": [4, 8, 16]}
  assert r["total_transitions"] > 1.0
  assert r["levels_equal"]
  assert r["counts_equal_single"] and r["counts_equal_host"]
  assert r["max_abs_diff_k"] <= 1e-7  # the same counts; float32 division may round apart
  assert r["max_rel_diff_k_host"] <= 2**-23
  assert r["max_abs_diff_K"] <= 1e-6 and r["max_abs_diff_U"] <= 1e-6
  assert r["max_abs_diff_params"] == 0.0


def _level_data(collectives):
  """Collectives that move level data: gathers and permutes of int8 levels or of
  more than a rate vector, and sums of more than one partial count per local row
  (exact counting sums each local row, then all-reduces the row sums)."""
  moves = lambda c: c["op"] != "all-reduce" and ("s8[" in c["shape"] or c["elements"] > TINY)
  return [c for c in collectives if moves(c) or c["elements"] > 256]


def test_the_optimizer_alone_needs_no_collectives(report):
  # Attribution: plain optax.sgd on the same sharded params compiles to no
  # collective, so every collective of the TALR steps below is TALR's.
  assert report["sampled"]["collectives_plain_sgd"] == []


def test_exact_counting_moves_no_level_data_across_devices(report):
  found = report["sampled"]["collectives_exact"]
  assert found, "counting a sharded tensor needs a cross-device sum"
  assert not [c for c in found if "s8[" in c["shape"]], found
  assert {c["op"] for c in found} <= {"all-reduce", "all-gather", "collective-permute"}
  # all-gathers and permutes only carry rate vectors (float32, a few entries).
  assert not _level_data(found), found


def test_sampled_counting_moves_no_level_data_across_devices(report):
  found = report["sampled"]["collectives_sampled"]
  assert not [c for c in found if "s8[" in c["shape"]], found
  assert not _level_data(found), found
  assert report["sampled"]["sampled_levels_specs"] == {
      "w1": "P(None, 'model')", "w2": "P('data', 'model')", "stack": "P('model', None, 'data')"}


def test_sharded_training_example():
  pytest.importorskip("flax")
  out = _run(str(ROOT / "examples" / "sharded_training.py"), "--steps", "60")
  assert "devices: 8" in out
  assert "(same: True)" in out  # levels sharded like the kernel
  assert "rates ('fc2/kernel',): shape (1,), replicated: True" in out
  line = next(l for l in out.splitlines() if l.startswith("loss:"))
  first = float(line.split("first")[1].split(",")[0])
  last = float(line.split("last")[1].split(";")[0])
  assert last < 0.8 * first


@pytest.mark.parametrize("arm", ["sampled", "sampled_jit_init", "oscillations_jit_init",
                                 "oscillations_sampled_jit_init"])
def test_default_make_mesh_is_explicit_and_equals_one_device(report, arm):
  r = report["explicit_default"]
  assert r["axis_types"] == ["Explicit", "Explicit"]
  r = r[arm]
  assert r["moved"] > 0
  assert r["integers_equal"]  # levels, directions, counts
  assert r["max_abs_diff_floats"] <= 1e-6 and r["max_abs_diff_params"] <= 1e-5
