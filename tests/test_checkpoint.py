"""Checkpoints: the Orbax recipe of docs/checkpoints.md, and the demo's checked store."""

from __future__ import annotations

import json
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
# pylint: disable-next=g-import-not-at-top
from talr_optax.demo.store import Checkpoints, CorruptCheckpointError


def _python(*args: str) -> str:
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.parametrize("flavor", ["functional", "nnx"])
def test_run_resumed_with_the_recipe_is_bit_identical(tmp_path, flavor):
  if flavor == "nnx":
    pytest.importorskip("flax")
  script = str(ROOT / "tests" / "_checkpoint_run.py")
  ckpt = tmp_path / "ckpt"
  # One process trains 40 steps and saves at step 17 on the way; a fresh
  # process restores step 17 and trains the remaining 23.
  _python(script, flavor, "full", str(ckpt), str(tmp_path / "full.npz"))
  assert sorted(os.listdir(ckpt)) == ["17"]
  out = _python(script, flavor, "resume", str(ckpt), str(tmp_path / "resumed.npz"))
  assert "steps 17..40" in out
  full, resumed = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(full.files) == sorted(resumed.files)
  assert any("prev_levels" in k for k in full.files)
  for k in full.files:
    assert full[k].dtype == resumed[k].dtype, k
    np.testing.assert_array_equal(full[k], resumed[k], err_msg=k)
  [count] = [k for k in full.files if k.endswith("talr_count']") or k.endswith(".talr_count")]
  assert int(full[count]) == 40
  # The resumed part of the run moved quantized weights (it tests something).
  moved = int(out.split("levels changed since the checkpoint:")[1].split()[0])
  assert moved > 10


# ---------------------------------------------------------------------------
# The demo's store: Orbax's CheckpointManager plus the checks it lacks.


def _state(quantize_w: bool = True, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32), "b": jnp.zeros(2)}
  scales = {"w": 1.0 if quantize_w else None, "b": 1.0}
  tx = talr.sgdt(0.1, 0.01, talr.levels_fn_from_scales(scales, 2))
  return {"params": params, "opt_state": tx.init(params)}


def test_a_step_another_writer_saved_is_never_replaced(tmp_path):
  with Checkpoints(tmp_path) as a, Checkpoints(tmp_path) as b:
    a.save(1, _state(seed=1), {"writer": "a"})
    a.save(2, _state(seed=2), {"writer": "a"})
    # b was opened before a saved: plain Orbax would replace step 2 here.
    with pytest.raises(FileExistsError, match=r"checkpoint .*2 exists already"):
      b.save(2, _state(seed=3), {"writer": "b"})
    assert b.latest_step() == 2
    step, state, meta = b.restore(_state())
  assert (step, meta) == (2, {"writer": "a"})
  np.testing.assert_array_equal(state["params"]["w"], _state(seed=2)["params"]["w"])


def test_restoring_into_another_structure_is_a_clear_error(tmp_path):
  with Checkpoints(tmp_path) as ckpt:
    ckpt.save(1, _state(), {})
    # The levels of w would be dropped silently by Orbax: w is not quantized here.
    with pytest.raises(ValueError, match=r"checkpoint .*1 does not fit this run .*only in the "
                                         r"checkpoint: opt_state/1/.*prev_levels/w"):
      ckpt.restore(_state(quantize_w=False))
    wider = _state()
    wider["params"]["w"] = wider["params"]["w"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"other shape or dtype: params/w \(saved \(\(64, 64\), "
                                         r"'float32'\), here \(\(64, 64\), 'bfloat16'\)\)"):
      ckpt.restore(wider)
    extra = dict(_state(), step=jnp.zeros((), jnp.int32))
    with pytest.raises(ValueError, match=r"only in this run: step"):
      ckpt.restore(extra)
    assert ckpt.restore(_state())[0] == 1


def _largest_file(directory: Path) -> Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes(path: Path) -> None:
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
  path.write_bytes(bytes(data))


# After a failed read Orbax leaves a callback for its closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [
    lambda step: _truncate(_largest_file(step / "state")),
    lambda step: _flip_bytes(_largest_file(step / "state")),
    lambda step: _truncate(step / "state" / "_METADATA"),
    lambda step: (step / "state" / "_METADATA").unlink(),
    lambda step: _truncate(step / "meta" / "metadata"),
    lambda step: _truncate(step / "state" / "manifest.ocdbt"),
], ids=["truncated_data", "altered_data", "truncated_metadata", "missing_metadata",
        "truncated_meta_json", "truncated_manifest"])
def test_a_damaged_checkpoint_is_reported_as_corrupt(tmp_path, damage):
  with Checkpoints(tmp_path) as ckpt:
    ckpt.save(1, _state(), {"epoch": 1})
    damage(tmp_path / "1")
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint {tmp_path / '1'} is corrupt"):
      ckpt.restore(_state())


def test_arrays_that_differ_from_their_checksum_are_corrupt(tmp_path):
  with Checkpoints(tmp_path) as ckpt:
    ckpt.save(1, _state(), {"epoch": 1})
    meta = tmp_path / "1" / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    assert saved["meta"] == {"epoch": 1} and len(saved["sha256"]) == 64
    meta.write_text(json.dumps(dict(saved, sha256="0" * 64)))
    with pytest.raises(CorruptCheckpointError, match="its arrays differ from the checksum"):
      ckpt.restore(_state())


def test_no_checkpoint_is_file_not_found(tmp_path):
  with Checkpoints(tmp_path / "empty") as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
      ckpt.restore(_state())


def test_core_does_not_import_orbax_or_the_demo():
  out = _python("-c", "import sys, talr_optax; "
                      "print(any(m.startswith(('orbax', 'talr_optax.demo')) for m in sys.modules))")
  assert out.strip() == "False"


# ---------------------------------------------------------------------------
# The recipe across a change of configuration: the setting is named.


def _sgdt_state(layers=4, **kw):
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(layers, 32, 32)),
                             jnp.float32), "b": jnp.zeros(8)}
  levels_fn = talr.levels_fn_from_scales({"w": 1.0, "b": None}, 2)
  return {"params": params, "opt_state": talr.sgdt(0.1, 0.01, levels_fn, **kw).init(params)}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("saved, here, match", [
    ({}, {"sample_size": 64}, "sample_size differs"),
    ({"sample_size": 64}, {}, "sample_size differs"),
    ({}, {"layer_axes": {"w": 0, "b": None}}, "layer_axes or granularity differs"),
    ({}, {"granularity": "global", "layers": 4}, None),
    ({"layer_axes": {"w": 0, "b": None}}, {"layer_axes": {"w": 0, "b": None}, "layers": 6},
     "the model differs, e.g. in its number of stacked layers"),
], ids=["sampled", "unsampled", "layer_axes", "granularity", "layers"])
def test_the_recipe_names_the_setting_a_restore_changes(tmp_path, saved, here, match):
  sys.path.insert(0, str(ROOT / "tests"))
  import _checkpoint_run  # pylint: disable=import-outside-toplevel
  recipe = _checkpoint_run.recipe()
  layers = here.pop("layers", 4)
  manager = recipe["checkpoint_manager"](tmp_path)
  recipe["save"](manager, 1, _sgdt_state(**saved), {})
  like = _sgdt_state(layers, **here)
  if match is None:  # one tensor: one rate either way, and the same shapes
    recipe["restore"](manager, like)
  else:
    with pytest.raises(ValueError, match=rf"does not fit this run: .*{match}") as info:
      recipe["restore"](manager, like)
    assert "strict" not in str(info.value)
  assert recipe["restore"](manager, _sgdt_state(**saved))[0] == 1
  manager.close()


def _remedy_states(layer_axes=None, sample_size=None):
  """A freezing stage around TALR and an oscillation monitor, on two stacked kernels."""
  import optax  # pylint: disable=import-outside-toplevel
  params = {"a": jnp.linspace(-1.0, 1.0, 3 * 64).reshape(3, 8, 8), "b": jnp.zeros(4)}
  scales = {"a": 1.0, "b": None}
  levels_fn = talr.levels_fn_from_scales(scales, 2)
  centers_fn = talr.centers_fn_from_scales(scales, 2)
  tx = optax.chain(
      talr.freeze_oscillations(levels_fn, centers_fn, 0.1, layer_axes=layer_axes, inner=optax.sgd(0.1)),
      talr.track_oscillations(levels_fn, layer_axes=layer_axes, sample_size=sample_size))
  return tx.init(params)


@pytest.mark.parametrize("changed,match", [
    (dict(layer_axes={"a": 0, "b": None}), "layer_axes or granularity differs"),
    (dict(sample_size=16), "sample_size differs"),
])
def test_check_restorable_names_the_remedies_settings(changed, match):
  """Freezing's and the monitor's fields are classified like TALR's (not 'the model differs')."""
  with pytest.raises(ValueError, match=match):
    talr.check_restorable(_remedy_states(), _remedy_states(**changed))


def test_check_restorable_names_sample_size_from_the_monitor_frequency_alone():
  """Only the monitor's per-weight frequency differs: still 'sample_size differs'."""
  saved, like = _remedy_states(), _remedy_states(sample_size=16)
  monitor = saved[1]
  only_frequency = (saved[0], monitor._replace(last_direction=like[1].last_direction))
  with pytest.raises(ValueError, match="sample_size differs"):
    talr.check_restorable(only_frequency, like)


@pytest.mark.parametrize("saved,like,match", [
    (None, "state", "saved holds no arrays"),
    ("state", {}, "like holds no arrays"),
    ({"x": jnp.zeros(2)}, "state", "no array path in common"),
])
def test_check_restorable_refuses_what_it_cannot_compare(saved, like, match):
  state = _remedy_states()
  pick = lambda x: state if x == "state" else x
  with pytest.raises(ValueError, match=match):
    talr.check_restorable(pick(saved), pick(like))
