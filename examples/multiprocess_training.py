"""Multi-process (multi-host style) QAT with SGDT: two processes, one sharded model.

Two JAX processes, each with 2 CPU devices, form one 4-device mesh
``("data", "model") = (2, 2)``: ``data`` runs across the processes, ``model``
within each. A 4-layer MLP with 2-bit fake-quantized hidden kernels (``w2``,
``w3``) is trained with ``talr.sgdt``; every kernel is sharded, the quantized
ones over devices of both processes, and the batch is split over ``data``
(each process loads only its half). Halfway, both processes save the train
state (params + optimizer state) with Orbax; at the end they restore it, check
that it is bit-identical to what was saved, resume from it and check that the
resumed run ends bit-identical to the uninterrupted one.

On one machine (from the repository root)::

    # spawns both processes on a free local port, prints process 0's output
    python examples/multiprocess_training.py --launch 2

    # or start them yourself, in two shells (same port, same new directory)
    JAX_PLATFORMS=cpu python examples/multiprocess_training.py \\
        --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 --ckpt-dir /tmp/mp_ckpt
    JAX_PLATFORMS=cpu python examples/multiprocess_training.py \\
        --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1 --ckpt-dir /tmp/mp_ckpt

    # the same run in one process with 4 devices: the same metrics and params
    python examples/multiprocess_training.py --local-devices 4

Needs Orbax: ``pip install -e ".[checkpoint]"``. The coordinator address is
checked before JAX's distributed runtime starts (a failed start there aborts
the process only after its timeout): it must be ``host:port`` with a port in
1-65535 and a host that resolves; process 0 runs the coordinator, so its
host must be an address of this machine and the port free; the other
processes wait at most ``--init-timeout`` seconds for process 0 to listen.

On real hosts (one process per host), what changes:

* ``--coordinator`` is ``<address of host 0>:<port>`` reachable from every
  host (not 127.0.0.1); ``--process-id`` is the host's rank. On Cloud TPU,
  SLURM, Open MPI and Kubernetes ``jax.distributed.initialize()`` with no
  arguments finds all three itself.
* Drop the CPU settings (``jax_num_cpu_devices``, gloo collectives,
  ``JAX_PLATFORMS=cpu``): the accelerators of each host are its devices.
* ``--data`` = the number of hosts, so that ``data`` runs across hosts and
  ``model`` within a host, where the interconnect is fastest.
* ``--ckpt-dir`` is a directory all hosts share (a network file system or a
  bucket, e.g. ``gs://...``); every process calls ``save`` and ``restore``.
* Each host reads only its rows of the global batch from its data source; the
  toy data here is generated from the step number, so every process could
  make the whole batch and keeps only its rows.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import orbax.checkpoint as ocp

import talr_optax as talr

BITS, IN, HIDDEN, CLASSES, BATCH = 2, 16, 64, 8, 64
QUANTIZED = ("w2", "w3")
SPECS = {  # every kernel sharded; the quantized ones over all 4 devices
    "w1": P(None, "model"),
    "w2": P("data", "model"),
    "b2": P("model"),
    "w3": P("model", "data"),
    "b3": P("data"),
    "w4": P("model", None),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command line of one process (or of the launcher, with ``--launch``)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--launch", type=int, default=None, metavar="N",
                      help="spawn N processes of this script on this machine and wait")
  parser.add_argument("--coordinator", default=None,
                      help="host:port of process 0 ([host]:port for IPv6)")
  parser.add_argument("--num-processes", type=int, default=None, help="default 1")
  parser.add_argument("--process-id", type=int, default=None, help="default 0")
  parser.add_argument("--init-timeout", type=int, default=60,
                      help="seconds to wait for the coordinator and the other processes")
  parser.add_argument("--local-devices", type=int, default=2,
                      help="CPU devices of this process")
  parser.add_argument("--data", type=int, default=2, help="size of the mesh axis 'data'")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--save-at", type=int, default=None,
                      help="step of the checkpoint (default: steps // 2)")
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--ckpt-dir", default=None,
                      help="new directory shared by all processes (default with one"
                           " process or --launch: a temporary one)")
  parser.add_argument("--timeout", type=float, default=600.0,
                      help="with --launch: seconds before the processes are killed")
  args = parser.parse_args(argv)
  args.save_at = args.steps // 2 if args.save_at is None else args.save_at
  if args.steps < 2 or not 1 <= args.save_at < args.steps:
    parser.error("need --steps >= 2 and 1 <= --save-at < --steps")
  if args.launch is not None:
    _check_launch(parser, args)
  args.num_processes = 1 if args.num_processes is None else args.num_processes
  args.process_id = 0 if args.process_id is None else args.process_id
  if args.launch is None and not 0 <= args.process_id < args.num_processes:
    parser.error(f"need 0 <= --process-id < --num-processes, got --process-id "
                 f"{args.process_id} and --num-processes {args.num_processes}")
  if args.num_processes > 1 and args.launch is None and not (args.coordinator
                                                             and args.ckpt_dir):
    parser.error("several processes need --coordinator and a shared --ckpt-dir")
  if args.coordinator is not None:
    try:
      args.coordinator_host, args.coordinator_port = parse_coordinator(args.coordinator)
    except ValueError as e:
      parser.error(str(e))
  if args.init_timeout < 1:
    parser.error(f"--init-timeout must be >= 1 second, got {args.init_timeout}")
  if args.local_devices < 1 or args.data < 1 or not args.lr > 0:
    parser.error("--local-devices and --data must be >= 1, --lr > 0")
  return args


def _check_launch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """``--launch N`` gives each process its id, the process count and a coordinator."""
  if args.launch < 1:
    parser.error(f"--launch must be >= 1, got {args.launch}")
  if args.num_processes is not None and args.num_processes != args.launch:
    parser.error(f"--num-processes {args.num_processes} conflicts with --launch "
                 f"{args.launch}: --launch starts {args.launch} processes and passes "
                 "--num-processes itself; drop --num-processes")
  for flag, value in (("--process-id", args.process_id),
                      ("--coordinator", args.coordinator)):
    if value is not None:
      parser.error(f"{flag} cannot be combined with --launch, which gives each process "
                   f"its own {flag}; drop {flag} (or start the processes yourself "
                   "without --launch)")


def parse_coordinator(address: str) -> tuple[str, int]:
  """``"host:port"`` (``"[::1]:port"`` for IPv6) as ``(host, port)``.

  Args:
    address: the ``--coordinator`` value.

  Returns:
    The host (without brackets) and the port, an int in 1-65535.

  Raises:
    ValueError: naming what is wrong with ``address``.
  """
  host, sep, port = address.rpartition(":")
  example = "e.g. 127.0.0.1:12355 or [::1]:12355"
  if not sep or not host or not port:
    raise ValueError(f"--coordinator must be host:port ({example}), got {address!r}")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  elif ":" in host:
    raise ValueError(f"--coordinator {address!r}: write an IPv6 host in brackets, "
                     f"[host]:port ({example})")
  if not port.isdigit():
    raise ValueError(f"--coordinator {address!r}: the port {port!r} is not a number")
  if not 1 <= int(port) <= 65535:
    raise ValueError(f"--coordinator {address!r}: the port {int(port)} is outside 1-65535")
  return host, int(port)


def _resolve(host: str, port: int, timeout: float) -> list[tuple[Any, ...]]:
  """``socket.getaddrinfo`` for a TCP connection, or SystemExit after ``timeout`` s."""
  pool = concurrent.futures.ThreadPoolExecutor(1)
  try:
    return pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM
                       ).result(timeout=timeout)
  except socket.gaierror as e:
    raise SystemExit(f"error: --coordinator host {host!r} does not resolve ({e}); "
                     "give host 0's address or name") from None
  except concurrent.futures.TimeoutError:
    raise SystemExit(f"error: --coordinator host {host!r} did not resolve within "
                     f"{timeout:g} s; give host 0's IP address") from None
  finally:
    pool.shutdown(wait=False)


def _check_port_free(port: int) -> None:
  """Binds ``port`` on every interface, as JAX's coordinator service will."""
  for family, wildcard in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((wildcard, port))
      return
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise SystemExit(f"error: port {port} of --coordinator is in use on this machine "
                         "(another run, or another program); pick a free port, or let "
                         "--launch pick one") from None
      if family == socket.AF_INET:
        raise SystemExit(f"error: cannot open port {port} of --coordinator: {e}") from None
      # No IPv6 here: try IPv4.


def check_coordinator(host: str, port: int, process_id: int, wait: float,
                      resolve_timeout: float = 5.0) -> None:
  """Fails within seconds, with a message, where the distributed runtime would abort later.

  Process 0 runs the coordinator: ``host`` must be an address of this machine
  and ``port`` free. Every other process waits up to ``wait`` seconds for a
  TCP connection to it (process 0 may start later), saying after a few
  seconds what it waits for.

  Args:
    host: the coordinator's host, as ``parse_coordinator`` returns it.
    port: its port.
    process_id: this process's rank.
    wait: seconds a process other than 0 waits for the coordinator.
    resolve_timeout: seconds allowed for resolving ``host``.

  Raises:
    SystemExit: with the cause, e.g. a host that does not resolve, a port in
      use, or no coordinator listening after ``wait`` seconds.
  """
  addresses = _resolve(host, port, resolve_timeout)
  if process_id == 0:
    for family, kind, proto, _, sockaddr in addresses:
      try:
        with socket.socket(family, kind, proto) as s:
          s.bind((sockaddr[0], 0) + tuple(sockaddr[2:]))
        break
      except OSError:
        continue
    else:
      raise SystemExit(f"error: process 0 runs the coordinator, but --coordinator host "
                       f"{host!r} is not an address of this machine; start process 0 on "
                       "that host, or give this machine's address")
    _check_port_free(port)
    return
  start = time.monotonic()
  told = False
  while True:
    try:
      socket.create_connection((host, port), timeout=1.0).close()
      return
    except OSError as e:
      last = e
    waited = time.monotonic() - start
    if waited > wait:
      raise SystemExit(f"error: no coordinator at {host}:{port} after {wait:.0f} s "
                       f"(last: {last}); is process 0 running with --coordinator "
                       f"{host}:{port}? (--init-timeout sets the wait)")
    if waited > 3 and not told:
      print(f"process {process_id}: waiting up to {wait:.0f} s for process 0's coordinator "
            f"at {host}:{port} ({last})", file=sys.stderr, flush=True)
      told = True
    time.sleep(0.2)


def start_jax(args: argparse.Namespace) -> None:
  """CPU devices, gloo collectives and the distributed runtime (before any JAX work)."""
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.local_devices)
  if args.num_processes > 1:
    # JAX's runtime aborts the process (after its timeout) on a bad address:
    # check it first, so that a mistake gets a message in seconds.
    check_coordinator(args.coordinator_host, args.coordinator_port, args.process_id,
                      wait=args.init_timeout)
    if args.process_id == 0:
      print(f"process 0: coordinator on port {args.coordinator_port}; waiting up to "
            f"{args.init_timeout} s for all {args.num_processes} processes to connect",
            file=sys.stderr, flush=True)
    # Cross-process collectives on CPU; GPUs and TPUs bring their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id,
                               initialization_timeout=args.init_timeout)


def init_params() -> dict[str, np.ndarray]:
  """He-normal kernels and zero biases, the same numbers on every process."""
  rng = np.random.default_rng(0)
  he = lambda shape: (rng.normal(size=shape) * np.sqrt(2.0 / shape[0])).astype(np.float32)
  return {"w1": he((IN, HIDDEN)), "w2": he((HIDDEN, HIDDEN)),
          "b2": np.zeros(HIDDEN, np.float32), "w3": he((HIDDEN, HIDDEN)),
          "b3": np.zeros(HIDDEN, np.float32), "w4": he((HIDDEN, CLASSES))}


def place(tree: dict[str, np.ndarray], shardings: dict[str, NamedSharding]
          ) -> dict[str, jax.Array]:
  """Global arrays from host values: each process puts only its own shards on its devices.

  (Models too large for one host's memory are created under ``jax.jit`` with
  ``out_shardings``, or read shard by shard from a checkpoint.)
  """
  return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
          for k, v in tree.items()}


def forward(params: dict[str, jax.Array], scales: dict[str, Any], x: jax.Array) -> jax.Array:
  """Full-precision first and last layers around two 2-bit layers."""
  q = lambda k: talr.fake_quant_weight(params[k], scales[k], BITS, multiply_scale=True)
  h = jax.nn.relu(x @ params["w1"])
  h = jax.nn.relu(h @ q("w2") + params["b2"])
  h = jax.nn.relu(h @ q("w3") + params["b3"])
  return h @ params["w4"]


def global_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
  """The global batch of a step (a function of the step only): inputs, teacher labels."""
  rng = np.random.default_rng([2025, step])
  x = rng.normal(size=(BATCH, IN)).astype(np.float32)
  teacher = np.random.default_rng(7).normal(size=(IN, CLASSES))
  return x, np.argmax(x @ teacher, axis=-1).astype(np.int32)


def process_rows(sharding: NamedSharding, n: int) -> slice:
  """The rows of an ``n``-row batch that this process's devices hold."""
  spans = [idx[0].indices(n)[:2]
           for idx in sharding.addressable_devices_indices_map((n,)).values()]
  return slice(min(s for s, _ in spans), max(e for _, e in spans))


def load_batch(step: int, sharding: NamedSharding) -> tuple[jax.Array, jax.Array]:
  """This process's rows of the step's batch, assembled into global arrays."""
  rows = process_rows(sharding, BATCH)
  x, y = global_batch(step)  # a real loader reads only x[rows], y[rows]
  return (jax.make_array_from_process_local_data(sharding, x[rows], x.shape),
          jax.make_array_from_process_local_data(sharding, y[rows], y.shape))


def host(x: jax.Array) -> np.ndarray:
  """A replicated value (loss, TALR rates) on the host: every process may read it."""
  return np.asarray(x)


def gather(tree: Any) -> Any:
  """Every array of ``tree`` in full on every process (numpy), e.g. to write or compare."""
  arrays = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  full = iter(multihost_utils.process_allgather(arrays, tiled=True))
  return jax.tree.map(lambda x: np.asarray(next(full)) if isinstance(x, jax.Array) else x,
                      tree)


def bit_identical(a: Any, b: Any) -> bool:
  """Same structure, and every array of the same dtype, sharding and bytes (local shards)."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  if ta != tb:
    return False
  for x, y in zip(la, lb):
    if not (isinstance(x, jax.Array) and isinstance(y, jax.Array)):
      if x != y:
        return False
      continue
    if (x.dtype != y.dtype or x.shape != y.shape
        or not x.sharding.is_equivalent_to(y.sharding, x.ndim)):
      return False
    sx = sorted(x.addressable_shards, key=lambda s: s.device.id)
    sy = sorted(y.addressable_shards, key=lambda s: s.device.id)
    if [s.device for s in sx] != [s.device for s in sy] or any(
        np.asarray(u.data).tobytes() != np.asarray(v.data).tobytes() for u, v in zip(sx, sy)):
      return False
  return True


def train(args: argparse.Namespace) -> dict[str, Any]:
  """Trains, checkpoints, restores and resumes; returns what the run shows.

  ``start_jax(args)`` must have run. The returned dict holds, among others,
  ``metrics`` (``talr.metrics`` of every step, as floats), ``final``,
  ``saved``, ``restored`` and ``resumed`` (train states gathered to numpy:
  after the last step, at the checkpoint, read back from it, and after the
  last step of the run resumed from it), and the checks
  ``restored_bit_identical`` and ``resumed_bit_identical`` (on this process's
  shards).
  """
  if jax.device_count() % args.data:
    raise SystemExit(f"--data {args.data} does not divide {jax.device_count()} devices")
  mesh = jax.make_mesh((args.data, jax.device_count() // args.data), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  batch_sharding = NamedSharding(mesh, P("data"))
  host_params = init_params()
  params = place(host_params, shardings)
  # Frozen weight step sizes s = 3 std(w), from the host copy: the same on every process.
  scales = {k: float(talr.initial_weight_scale(v)) if k in QUANTIZED else None
            for k, v in host_params.items()}
  levels_fn = talr.levels_fn_from_scales(scales, bits=BITS)
  tx = talr.sgdt(optax.cosine_decay_schedule(args.lr, args.steps),
                 talr.cosine_target(talr.initial_target(BITS), args.steps), levels_fn,
                 momentum=0.9, weight_decay=1e-4)

  @jax.jit
  def step(state, x, y):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        forward(p, scales, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, loss

  @jax.jit
  def levels_moved(a, b):  # weights whose 2-bit level differs between two params
    la, lb = levels_fn(a), levels_fn(b)
    return sum(jnp.sum(la[k] != lb[k]) for k in QUANTIZED)

  def run(state, start, stop, on_step: Callable[[int, Any, jax.Array], None]):
    for t in range(start, stop):
      state, loss = step(state, *load_batch(t, batch_sharding))
      on_step(t + 1, state, loss)
    return state

  init = {"params": params, "opt_state": jax.jit(tx.init)(params)}
  # jit(tx.init) leaves the momentum zeros replicated; the compiled step gives
  # the state its steady layout (the momentum sharded like its param). Start
  # in that layout, so the restore template below has the layout of the saved
  # state.
  init = jax.device_put(init, step.lower(init, *load_batch(0, batch_sharding))
                        .compile().output_shardings[0])
  metrics, losses, saved = [], [], {}
  # Orbax's CheckpointManager, as in docs/checkpoints.md.
  manager = ocp.CheckpointManager(args.ckpt_dir,
                                  options=ocp.CheckpointManagerOptions(create=True))
  if manager.latest_step() is not None:
    raise SystemExit(f"{args.ckpt_dir} already holds a checkpoint; pass a new directory")

  def on_step(done, state, loss):
    metrics.append({k: host(v).tolist() for k, v in talr.metrics(state["opt_state"]).items()})
    losses.append(float(host(loss)))
    if done == args.save_at:  # every process saves its shards; Orbax syncs them
      manager.save(done, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"next_step": done})))
      manager.wait_until_finished()
      saved["state"] = state

  final = run(init, 0, args.steps, on_step)
  # A fresh job would build `init` the same way and restore into its shardings.
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, init)
  out = manager.restore(args.save_at, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  manager.close()
  start, restored, meta = args.save_at, out.state, out.meta
  assert meta == {"next_step": start}, meta
  resumed = run(restored, start, args.steps, lambda *_: None)
  return {
      "process": jax.process_index(), "processes": jax.process_count(),
      "local_devices": jax.local_device_count(), "devices": jax.device_count(),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "mesh_processes": [[int(d.process_index) for d in row] for row in mesh.devices],
      "specs": {k: str(v.sharding.spec) for k, v in final["params"].items()},
      "metrics": metrics, "losses": losses,
      "levels_moved": int(host(levels_moved(params, final["params"]))),
      "levels_total": int(sum(params[k].size for k in QUANTIZED)),
      "restored_bit_identical": bit_identical(restored, saved["state"]),
      "resumed_bit_identical": bit_identical(resumed, final),
      "final": gather(final), "saved": gather(saved["state"]), "restored": gather(restored),
      "resumed": gather(resumed),
  }


def report(r: dict[str, Any], save_at: int) -> None:
  """Prints what the run shows."""
  print(f"process {r['process']} of {r['processes']}: {r['local_devices']} local devices,"
        f" {r['devices']} in all; mesh {r['mesh']}, devices' processes {r['mesh_processes']}")
  print(f"shardings: {r['specs']}")
  print(f"loss: first {r['losses'][0]:.3f}, last {r['losses'][-1]:.3f}")
  m = r["metrics"][-1]
  for k in QUANTIZED:
    print(f"{k}: U = {m[f'talr/{k}']:.4g}, K = {m[f'ema_transition_rate/{k}']:.3e},"
          f" R = {m[f'target_transition_rate/{k}']:.3e}")
  print(f"2-bit levels changed over the run: {r['levels_moved']} of {r['levels_total']}")
  print(f"checkpoint of step {save_at} restored bit-identical: {r['restored_bit_identical']}")
  print(f"resumed run equals the uninterrupted one: {r['resumed_bit_identical']}")


def free_port() -> int:
  """A TCP port free on this machine right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(commands: Sequence[Sequence[str]], *, timeout: float,
           cwd: str | os.PathLike[str] | None = None,
           env: dict[str, str] | None = None) -> list[str]:
  """Runs one process per command and waits for all of them; returns their stdout.

  If one process fails, or the timeout passes, all are killed (a process
  waiting for a dead peer would otherwise hang in a collective) and a
  RuntimeError carries every process's exit status and the end of its stderr.
  """
  with tempfile.TemporaryDirectory() as logs:
    files = [(open(os.path.join(logs, f"{i}.out"), "w+"),
              open(os.path.join(logs, f"{i}.err"), "w+")) for i in range(len(commands))]
    procs = [subprocess.Popen(list(c), cwd=cwd, env=env, stdout=o, stderr=e)
             for c, (o, e) in zip(commands, files)]
    deadline, problem = time.monotonic() + timeout, None
    try:
      while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
          problem = "a process failed"
          break
        if time.monotonic() > deadline:
          problem = f"timed out after {timeout:.0f} s"
          break
        time.sleep(0.1)
      if any(p.returncode for p in procs):
        problem = problem or "a process failed"
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
        p.wait()
    outputs = []
    for o, e in files:
      o.seek(0), e.seek(0)
      outputs.append((o.read(), e.read()))
      o.close(), e.close()
  if problem:
    details = "\n".join(f"--- process {i} (exit {p.returncode}) stderr:\n{err[-4000:]}"
                        for i, (p, (_, err)) in enumerate(zip(procs, outputs)))
    raise RuntimeError(f"{problem}\n{details}")
  return [out for out, _ in outputs]


def process_commands(script: str, n: int, args: Sequence[str]) -> list[list[str]]:
  """The command line of each of ``n`` local processes of ``script`` (one free port)."""
  address = f"127.0.0.1:{free_port()}"
  return [[sys.executable, script, "--coordinator", address, "--num-processes", str(n),
           "--process-id", str(i), *args] for i in range(n)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  """Runs one process, or with ``--launch N`` spawns N and prints process 0's output."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.launch is not None:
    i = next(i for i, a in enumerate(argv) if a.startswith("--launch"))
    rest = argv[:i] + argv[i + (1 if "=" in argv[i] else 2):]  # the processes' arguments
    with tempfile.TemporaryDirectory() as tmp:
      if args.ckpt_dir is None:
        rest += ["--ckpt-dir", os.path.join(tmp, "ckpt")]
      outs = launch(process_commands(os.path.abspath(__file__), args.launch, rest),
                    timeout=args.timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    # Process 0's report, without the collectives library's connection notes.
    print("".join(l for l in outs[0].splitlines(True) if not l.startswith("[Gloo]")), end="")
    return None
  start_jax(args)
  tmp = None
  if args.ckpt_dir is None:
    tmp = args.ckpt_dir = tempfile.mkdtemp()
  try:
    r = train(args)
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  if r["process"] == 0:
    report(r, args.save_at)
  else:
    print(f"process {r['process']} of {r['processes']}: checkpoint restored bit-identical:"
          f" {r['restored_bit_identical']}, resumed run equal: {r['resumed_bit_identical']}")
  return r


if __name__ == "__main__":
  main()
