"""Multi-process training: 2 processes x 2 CPU devices against 1 process x 4 devices.

Two processes started with ``jax.distributed.initialize`` on localhost (gloo
collectives) train ``examples/multiprocess_training.py``'s quantized MLP with
``sgdt`` on one 4-device mesh, with the quantized kernels sharded over the
devices of both processes and the batch split between them; they save an
Orbax checkpoint together, restore it and resume from it. A single process
with 4 devices runs the same script. Every run goes through
``tests/_multiprocess_run.py``, which writes the metrics and train states.

The two runs must agree bit for bit, with no tolerance: the mesh has the same
shape, so each device runs the same partitioned program, and in it XLA sums
floats across devices over one mesh axis at a time (seen in the compiled
step), i.e. over two devices, and a + b = b + a exactly whichever library
(gloo between processes, XLA's own within one) does the sum. The transition
counts are integer sums, exact at any size. (With 3 or more devices on a
reduced axis the order of a float sum could differ between the libraries and
the params by rounding; the counts would still agree.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "_multiprocess_run.py"
STEPS, SAVE_AT = 30, 12
TIMEOUT = 300  # seconds for one launch (both processes); a run takes ~10 s here

pytest.importorskip("orbax.checkpoint")
sys.path.insert(0, str(ROOT / "examples"))
import multiprocess_training as example  # pylint: disable=g-import-not-at-top,wrong-import-position


def _env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  # The device count comes from the script's --local-devices, not from XLA_FLAGS.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def _run(out: Path, processes: int, local_devices: int) -> tuple[list[dict], list[dict], str]:
  """Runs the script in `processes` processes; returns their reports, arrays, stdout 0."""
  args = ["--out", str(out), "--local-devices", str(local_devices), "--steps", str(STEPS),
          "--save-at", str(SAVE_AT), "--ckpt-dir", str(out / "ckpt")]
  for attempt in range(2):
    if processes == 1:
      commands = [[sys.executable, str(RUNNER), *args]]
    else:
      commands = example.process_commands(str(RUNNER), processes, args)
    try:
      stdout = example.launch(commands, timeout=TIMEOUT, cwd=ROOT, env=_env())
      break
    except RuntimeError as e:
      # The free port found for the coordinator was taken before it started.
      if attempt or "address already in use" not in str(e).lower():
        raise AssertionError(f"{processes}-process run failed: {e}") from None
  reports = [json.loads((out / f"process{i}.json").read_text()) for i in range(processes)]
  arrays = [dict(np.load(out / f"process{i}.npz")) for i in range(processes)]
  return reports, arrays, stdout[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  return {"two": _run(tmp / "two", 2, 2), "one": _run(tmp / "one", 1, 4), "dir": tmp}


def _assert_bitwise_equal(a: dict, b: dict, prefix: str, what: str) -> None:
  keys = sorted(k for k in a if k.startswith(prefix))
  assert keys and keys == sorted(k for k in b if k.startswith(prefix)), what
  for k in keys:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
    assert a[k].tobytes() == b[k].tobytes(), (
        f"{what}: {k} differs, max abs diff"
        f" {np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))}")


def test_two_processes_share_one_mesh(runs):
  (r0, r1), _, _ = runs["two"]
  for i, r in enumerate((r0, r1)):
    assert (r["process"], r["processes"], r["local_devices"], r["devices"]) == (i, 2, 2, 4)
  # "data" runs across the processes, "model" within each.
  assert r0["mesh"] == {"data": 2, "model": 2}
  assert r0["mesh_processes"] == [[0, 0], [1, 1]]
  # The quantized kernels are split over devices of both processes.
  assert r0["specs"]["w2"] == "P('data', 'model')" and r0["specs"]["w3"] == "P('model', 'data')"
  (ref,), _, _ = runs["one"]
  assert ref["processes"] == 1 and ref["devices"] == 4 and ref["mesh"] == r0["mesh"]


def test_metrics_of_every_step_equal_the_one_process_run(runs):
  reports, _, _ = runs["two"]
  (ref,), _, _ = runs["one"]
  assert len(ref["metrics"]) == STEPS
  assert {"talr/w2", "transition_rate/w2", "ema_transition_rate/w3"} <= set(ref["metrics"][0])
  for r in reports:  # each process reads the replicated rates itself
    for t, (m, m_ref) in enumerate(zip(r["metrics"], ref["metrics"])):
      assert m == m_ref, f"process {r['process']}, step {t + 1}: {m} != {m_ref}"
    assert r["losses"] == ref["losses"]
  # The run tests something: weights cross levels all along, and it learns.
  assert ref["levels_moved"] > 200
  moving = [t for t, m in enumerate(ref["metrics"]) if m["transition_rate/w2"] > 0]
  assert len(moving) > STEPS // 2
  assert ref["losses"][-1] < 0.6 * ref["losses"][0]


def test_final_state_equals_the_one_process_run(runs):
  _, arrays, _ = runs["two"]
  _, (ref,), _ = runs["one"]
  for i, a in enumerate(arrays):
    _assert_bitwise_equal(a, ref, "final/", f"process {i} vs 1 process")
  assert any("prev_levels" in k for k in ref if k.startswith("final/"))


def test_checkpoint_restores_bit_identical(runs):
  reports, arrays, _ = runs["two"]
  assert sorted(os.listdir(runs["dir"] / "two" / "ckpt")) == [str(SAVE_AT)]
  for r, a in zip(reports, arrays):
    # Checked in each process on its own shards: dtype, sharding and bytes.
    assert r["restored_bit_identical"], f"process {r['process']}"
    _assert_bitwise_equal(a, {k.replace("saved/", "restored/"): v for k, v in a.items()
                              if k.startswith("saved/")}, "restored/",
                          f"process {r['process']}: restored vs saved")
    counts = [v for k, v in a.items() if k.startswith("restored/") and k.endswith("talr_count")]
    assert counts and all(int(c) == SAVE_AT for c in counts)
  # The checkpoint is the state the one-process run had at that step.
  _, (ref,), _ = runs["one"]
  _assert_bitwise_equal(arrays[0], ref, "saved/", "saved state, 2 processes vs 1")


def test_resumed_run_equals_uninterrupted_run(runs):
  reports, arrays, _ = runs["two"]
  for r, a in zip(reports, arrays):
    assert r["resumed_bit_identical"], f"process {r['process']}"
    _assert_bitwise_equal(a, {k.replace("final/", "resumed/"): v for k, v in a.items()
                              if k.startswith("final/")}, "resumed/",
                          f"process {r['process']}: resumed vs uninterrupted")


def test_example_report(runs):
  _, _, out = runs["two"]
  assert "process 0 of 2: 2 local devices, 4 in all" in out
  assert f"checkpoint of step {SAVE_AT} restored bit-identical: True" in out
  assert "resumed run equals the uninterrupted one: True" in out


def test_launch_stops_all_processes_when_one_fails():
  # The survivor would wait for its peer; it is killed at once, and the error
  # carries the failing process's stderr.
  crash = [sys.executable, "-c", "import sys; sys.exit('boom in process 0')"]
  wait = [sys.executable, "-c", "import time; time.sleep(120)"]
  with pytest.raises(RuntimeError, match="(?s)a process failed.*boom in process 0"):
    example.launch([crash, wait], timeout=60)
  with pytest.raises(RuntimeError, match="timed out after 1 s"):
    example.launch([wait], timeout=1)
