"""Checkpoint and resume with Orbax (``talr_optax.checkpoint``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import talr_optax as talr

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("orbax.checkpoint")
from talr_optax.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top


def _python(*args: str) -> str:
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_resumed_run_is_bit_identical_to_uninterrupted_run(tmp_path):
  script = str(ROOT / "tests" / "_checkpoint_run.py")
  ckpt = tmp_path / "ckpt"
  # One process trains 40 steps and saves at step 17 on the way; a fresh
  # process restores step 17 and trains the remaining 23.
  _python(script, "full", str(ckpt), str(tmp_path / "full.npz"))
  assert sorted(os.listdir(ckpt)) == ["17"]
  out = _python(script, "resume", str(ckpt), str(tmp_path / "resumed.npz"))
  assert "steps 17..40" in out
  full, resumed = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(full.files) == sorted(resumed.files)
  assert any("prev_levels" in k for k in full.files) and any("talr_count" in k for k in full.files)
  for k in full.files:
    assert full[k].dtype == resumed[k].dtype, k
    np.testing.assert_array_equal(full[k], resumed[k], err_msg=k)
  assert int(full["['opt_state'][2].talr_count"]) == 40
  # The resumed part of the run moved quantized weights (it tests something).
  moved = int(out.split("levels changed since the checkpoint:")[1].split()[0])
  assert moved > 10


def _state():
  params = {"w": jnp.linspace(-1, 1, 8), "b": jnp.zeros(2)}
  tx = talr.sgdt(0.1, 0.01, talr.levels_fn_from_scales({"w": 1.0, "b": None}, 2))
  return {"params": params, "opt_state": tx.init(params)}


def test_existing_checkpoint_is_never_overwritten(tmp_path):
  state = _state()
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, state, meta={"epoch": 1})
    other = dict(state, params={"w": state["params"]["w"] + 1, "b": state["params"]["b"]})
    for step in (5, 3):
      with pytest.raises(FileExistsError, match="already exists"):
        ckpt.save(step, other)
    # A save that fails half way leaves the earlier checkpoint as it was.
    with pytest.raises(Exception):
      ckpt.save(6, {"x": object()})
    assert ckpt.all_steps() == [5]
    step, restored, meta = ckpt.restore(state)
  assert step == 5 and meta == {"epoch": 1}
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])


def test_restore_errors_are_clear(tmp_path):
  with Checkpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore(_state())
  with Checkpointer(tmp_path / "one") as ckpt:
    ckpt.save(1, _state())
    with pytest.raises(FileNotFoundError, match="step 2"):
      ckpt.restore(_state(), step=2)
    wrong = _state()
    wrong["opt_state"] = talr.adamt(
        0.1, 0.01, talr.levels_fn_from_scales({"w": 1.0, "b": None}, 2)).init(wrong["params"])
    with pytest.raises(ValueError, match="another model or optimizer"):
      ckpt.restore(wrong)


@pytest.mark.parametrize("kwargs, match", [
    (dict(directory=""), "directory must be a path"),
    (dict(directory="x", max_to_keep=0), r"max_to_keep must be None or an integer >= 1"),
])
def test_checkpointer_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Checkpointer(**kwargs)


def test_bad_step_and_meta(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
      ckpt.save(-1, _state())
    with pytest.raises(ValueError, match="meta must be a dict"):
      ckpt.save(1, _state(), meta=[1])


def test_core_does_not_import_orbax():
  out = _python("-c", "import sys, talr_optax; print('orbax' in ' '.join(sys.modules))")
  assert out.strip() == "False"
