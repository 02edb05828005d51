"""TALR with params sharded over 8 simulated CPU devices (a 2 x 4 mesh).

The device count is fixed when JAX initialises, so the runs happen in a
subprocess (``tests/_sharded_run.py``, and the shipped example); this process
keeps its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
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


@pytest.mark.parametrize("granularity", ["per_tensor", "global"])
def test_sharded_run_equals_single_device_run(report, granularity):
  r = report[granularity]
  assert r["total_transitions"] > 50  # the runs do move weights across levels
  assert r["levels_equal"]
  assert r["max_abs_diff_U"] <= 1e-6
  assert r["max_abs_diff_K"] <= 1e-6
  assert r["max_abs_diff_params"] <= 1e-5


@pytest.mark.parametrize("granularity", ["per_tensor", "global"])
def test_transition_rate_is_the_exact_cross_device_count(report, granularity):
  # k at every step, from levels gathered to the host, against the device value.
  assert report[granularity]["max_abs_diff_k_host"] <= 1e-7


def test_global_rate_is_replicated(report):
  assert report["global"]["rate_is_replicated"]


def test_mesh_with_explicit_axes(report):
  r = report["explicit"]
  assert r["levels_sharded_like_params"]
  assert r["max_abs_diff_U"] <= 1e-6 and r["max_abs_diff_params"] <= 1e-5


def test_sharded_training_example():
  pytest.importorskip("flax")
  out = _run(str(ROOT / "examples" / "sharded_training.py"), "--steps", "60")
  assert "devices: 8" in out
  assert "(same: True)" in out  # levels sharded like the kernel
  line = next(l for l in out.splitlines() if l.startswith("loss:"))
  first, last = float(line.split("first")[1].split(",")[0]), float(line.split("last")[1].split(";")[0])
  assert last < 0.8 * first
