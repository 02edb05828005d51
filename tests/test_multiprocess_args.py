"""``examples/multiprocess_training.py``: a bad coordinator or process setup fails in seconds.

JAX's distributed runtime aborts the whole process (an absl fatal error and a
stack trace) only when its ``initialization_timeout`` runs out; the example
checks the address, the port and the flags before it starts that runtime.
Every socket here is on the loopback interface, or only bound, never used.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "multiprocess_training.py"

pytest.importorskip("orbax.checkpoint")
sys.path.insert(0, str(ROOT / "examples"))
import multiprocess_training as example  # pylint: disable=g-import-not-at-top,wrong-import-position


def _closed_port() -> int:
  """A loopback port with nothing listening on it (right now)."""
  return example.free_port()


def _parse_error(capsys, argv: list[str]) -> str:
  with pytest.raises(SystemExit) as e:
    example.parse_args(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


@pytest.mark.parametrize("address, host, port", [
    ("127.0.0.1:12355", "127.0.0.1", 12355),
    ("localhost:1", "localhost", 1),
    ("[::1]:65535", "::1", 65535),
])
def test_parse_coordinator(address, host, port):
  assert example.parse_coordinator(address) == (host, port)


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1", r"must be host:port \(e\.g\. 127\.0\.0\.1:12355"),
    ("127.0.0.1:", "must be host:port"),
    (":12355", "must be host:port"),
    ("127.0.0.1:http", "the port 'http' is not a number"),
    ("127.0.0.1:-5", "the port '-5' is not a number"),
    ("127.0.0.1:0", "the port 0 is outside 1-65535"),
    ("127.0.0.1:70000", "the port 70000 is outside 1-65535"),
    ("::1:12355", "write an IPv6 host in brackets"),
])
def test_bad_coordinator_is_a_usage_error(capsys, address, message):
  err = _parse_error(capsys, ["--coordinator", address, "--num-processes", "2",
                              "--process-id", "1", "--ckpt-dir", "/nonexistent"])
  assert repr(address) in err
  assert re.search(message, err), err


@pytest.mark.parametrize("argv, message", [
    (["--launch", "2", "--num-processes", "3"],
     "--num-processes 3 conflicts with --launch 2: --launch starts 2 processes"),
    (["--launch", "2", "--process-id", "1"], "--process-id cannot be combined with --launch"),
    (["--launch", "2", "--coordinator", "127.0.0.1:12355"],
     "--coordinator cannot be combined with --launch"),
    (["--launch", "0"], "--launch must be >= 1, got 0"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1",
      "--ckpt-dir", "d"], "need 0 <= --process-id < --num-processes, got --process-id 2"),
    (["--init-timeout", "0"], "--init-timeout must be >= 1 second, got 0"),
])
def test_conflicting_process_flags_are_usage_errors(capsys, argv, message):
  assert message in _parse_error(capsys, argv)


def test_launch_with_the_same_process_count_is_accepted():
  args = example.parse_args(["--launch", "2", "--num-processes", "2"])
  assert (args.launch, args.num_processes) == (2, 2)
  args = example.parse_args([])
  assert (args.num_processes, args.process_id, args.init_timeout) == (1, 0, 60)


def test_process_0_refuses_a_port_in_use():
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(SystemExit, match=f"port {port} of --coordinator is in use"):
      example.check_coordinator("127.0.0.1", port, process_id=0, wait=30)


def test_process_0_refuses_an_address_of_another_machine():
  # 192.0.2.1 is reserved for documentation (RFC 5737): never this machine's.
  # Binding to it fails locally; no packet is sent.
  with pytest.raises(SystemExit, match="host '192.0.2.1' is not an address of this machine"):
    example.check_coordinator("192.0.2.1", 12355, process_id=0, wait=30)


def test_process_0_accepts_a_free_local_port():
  example.check_coordinator("127.0.0.1", _closed_port(), process_id=0, wait=30)


def test_unresolvable_host_is_named(monkeypatch):
  def fail(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
  monkeypatch.setattr(socket, "getaddrinfo", fail)
  with pytest.raises(SystemExit, match="host 'hostx' does not resolve"):
    example.check_coordinator("hostx", 12355, process_id=1, wait=30)


def test_slow_resolver_is_cut_short(monkeypatch):
  real = socket.getaddrinfo
  monkeypatch.setattr(socket, "getaddrinfo",
                      lambda *a, **k: (time.sleep(3), real(*a, **k))[1])
  t = time.monotonic()
  with pytest.raises(SystemExit, match="did not resolve within 0.2 s"):
    example.check_coordinator("127.0.0.1", 12355, process_id=1, wait=30,
                              resolve_timeout=0.2)
  assert time.monotonic() - t < 2


def test_other_process_waits_for_the_coordinator_then_says_why(capsys):
  port = _closed_port()
  t = time.monotonic()
  with pytest.raises(SystemExit, match=(
      f"no coordinator at 127.0.0.1:{port} after 4 s .*is process 0 running with "
      f"--coordinator 127.0.0.1:{port}")):
    example.check_coordinator("127.0.0.1", port, process_id=1, wait=4)
  assert 4 <= time.monotonic() - t < 15
  # While waiting it said what for, after a few seconds.
  assert f"process 1: waiting up to 4 s for process 0's coordinator at 127.0.0.1:{port}" in (
      capsys.readouterr().err)


def test_other_process_goes_on_once_the_coordinator_listens():
  with socket.socket() as coordinator:
    coordinator.bind(("127.0.0.1", 0))
    coordinator.listen()
    port = coordinator.getsockname()[1]
    t = time.monotonic()
    example.check_coordinator("127.0.0.1", port, process_id=1, wait=30)
    assert time.monotonic() - t < 5


def test_script_without_coordinator_exits_with_a_message_not_an_abort(tmp_path):
  # Process 1 of 2 with nobody on the port: before the check, JAX's runtime
  # aborted after 120 s with a C++ stack trace.
  port = _closed_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  t = time.monotonic()
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--coordinator", f"127.0.0.1:{port}", "--num-processes",
       "2", "--process-id", "1", "--ckpt-dir", str(tmp_path / "ckpt"), "--init-timeout", "2"],
      capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
  elapsed = time.monotonic() - t
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert f"error: no coordinator at 127.0.0.1:{port} after 2 s" in proc.stderr
  assert "Check failure" not in proc.stderr and "Traceback" not in proc.stderr
  assert elapsed < 120, elapsed  # the import of JAX dominates; the wait is 2 s
