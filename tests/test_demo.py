"""The demo (``talr_optax.demo``): flag checks, the run store, tiny end-to-end runs."""

import ast
import importlib.util
import json
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from _doc_quotes import numbers, quoted_line, shape  # pylint: disable=g-import-not-at-top
from talr_optax import demo  # pylint: disable=g-import-not-at-top
from talr_optax.demo import runner as demo_runner  # pylint: disable=g-import-not-at-top
from talr_optax.demo import train as demo_train  # pylint: disable=g-import-not-at-top
from talr_optax.demo.tasks import TASKS, make_model  # pylint: disable=g-import-not-at-top

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--bits", "2", "--epochs", "2", "--fp-epochs", "1"]
R0 = 5e-3 * 2**0.5  # the target's start at 2 bits: lambda * sqrt(bits)


def _cosine(r0: float, total: int, step: np.ndarray) -> np.ndarray:
  """The paper's cosine target, written out: R(t) = R_0 (1 + cos(pi t / T)) / 2."""
  return r0 * (1 + np.cos(np.pi * np.minimum(step, total) / total)) / 2


def _exit_message(argv, capsys) -> str:
  """stderr of a command line that must exit with status 2 before any work."""
  with pytest.raises(SystemExit) as e:
    demo.main(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--bits", "5"], "--bits"),
        (["--bits", "two"], "--bits"),
        (["--bits", "2,2"], r"--bits must not repeat a bit width .* 2 more than once"),
        (["--bits", "2,1,1,2"], r"--bits must not repeat .* 1, 2 more than once"),
        (["--seeds", "0"], r"--seeds must be an integer >= 1, got --seeds = 0"),
        (["--epochs", "-3"], "--epochs"),
        (["--batch-size", "x"], r"--batch-size must be an integer >= 1, got --batch-size = 'x'"),
        (["--rule", "exp"], "--rule"),
        (["--optimizer", "lion"], "--optimizer"),
        (["--dataset", "cifar10"], "--data-dir"),
        (["--model", "resnet20"],
         r"--model resnet20 does not fit --dataset digits; use --model cnn"),
        (["--lam", "0"], r"--lam must be in \(0, 0.5\]"),
        (["--sample-size", "0"], r"--sample-size must be an integer >= 1, got --sample-size = 0"),
        (["--sample-size", "2.5"], r"--sample-size must be an integer >= 1, got --sample-size = '2.5'"),
        (["--sample-size", "-64"], r"--sample-size must be an integer >= 1"),
        (["--out", ""], "--out must name a directory, got an empty path"),
        (["--out", "  "], "--out must name a directory"),
        (["--checkpoint-dir", ""], "--checkpoint-dir must name a directory"),
        (["--data-dir", "somewhere"], "--data-dir is not used with --dataset digits"),
        (["--dataset", "cifar10", "--data-dir", ""], "--data-dir must name a directory"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv, match, capsys):
  err = _exit_message(argv, capsys)
  assert re.search(match, err), err


@pytest.mark.parametrize("flag", ["--out", "--checkpoint-dir"])
def test_a_file_where_a_directory_goes_is_refused_when_parsing(flag, tmp_path, capsys):
  file = tmp_path / "results.txt"
  file.write_text("keep me")
  err = _exit_message([flag, str(file)], capsys)
  assert f"{flag} must be a directory, but {file} is a file" in err
  err = _exit_message([flag, str(file / "sub")], capsys)
  assert f"is inside {file}, a file" in err
  assert file.read_text() == "keep me"


def _unwritable_dirs(tmp_path):
  """Directories this process cannot write: /proc (even as root), and a 0o555 one."""
  yield "/proc"
  if os.geteuid() != 0:  # root writes into a read-only directory anyway
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    yield str(locked)


@pytest.mark.parametrize("flag", ["--out", "--checkpoint-dir"])
def test_an_out_that_cannot_be_written_is_refused_when_parsing(flag, tmp_path, capsys):
  for directory in _unwritable_dirs(tmp_path):
    err = _exit_message([flag, directory], capsys)
    assert f"{flag} must be a directory this process can write, but {directory} is not " \
           "writable" in err, err
    err = _exit_message([flag, f"{directory}/new/demo"], capsys)
    assert f"but {directory}/new/demo cannot be created in {directory} (" in err, err
  # The lm task shares --out and its check.
  err = _exit_message(["--task", "lm", "--out", "/proc/demo"], capsys)
  assert "--out must be a directory this process can write" in err


def test_help_gives_each_task_its_own_default_batch_size(capsys):
  from talr_optax.demo.lm_config import LMConfig  # pylint: disable=import-outside-toplevel
  text = " ".join(demo.build_parser().format_help().split())
  lm_default = demo.config_from_args(["--task", "lm"]).batch_size
  assert lm_default == LMConfig.batch_size
  assert (f"(default {TASKS['digits'].defaults.batch_size} on digits, "
          f"{TASKS['cifar10'].defaults.batch_size} on cifar10, {lm_default} windows with "
          "--task lm)") in text
  assert demo.config_from_args([]).batch_size == TASKS["digits"].defaults.batch_size


@pytest.mark.parametrize("argv, missing", [([], ["rich", "sklearn"]),
                                           (["--task", "lm"], ["rich"])])
def test_without_the_demo_extra_the_message_names_it(argv, missing, monkeypatch, capsys):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("rich", "sklearn") else find_spec(name, *a))
  assert demo.main(argv + ["--out", "/nowhere/never/written"]) == 1
  err = capsys.readouterr().err
  assert f"the demo needs {', '.join(missing)}, not installed here" in err
  assert 'pip install -e ".[demo]"' in err
  assert not os.path.exists("/nowhere")


def test_entry_point_exits_2_like_argparse():
  proc = subprocess.run([sys.executable, "-m", "talr_optax.demo", "--bits", "2,2"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  assert proc.stderr.startswith("usage: python -m talr_optax.demo")
  assert "argument --bits: --bits must not repeat" in proc.stderr


def test_defaults_follow_the_dataset_and_quick():
  cfg = demo.config_from_args(["--quick"])
  assert (cfg.seeds, cfg.bits, cfg.model, cfg.epochs, cfg.fp_epochs) == (1, (2, 1), "cnn", 6, 4)
  cfg = demo.config_from_args(["--dataset", "cifar10", "--data-dir", "x"])
  assert (cfg.model, cfg.batch_size, cfg.epochs, cfg.fp_epochs) == ("resnet20", 256, 400, 200)


# ---------------------------------------------------------------------------
# The runner's shared parts


def _record(bits, method, seed, score, osc, K, R, md2tp_mean):
  return {"bits": bits, "method": method, "seed": seed, "final_test_accuracy": score,
          "tracking_error": demo_runner.tracking_error({"K": K, "R": R}, 0.5),
          "late_oscillation_frequency": demo_runner.late_oscillation_frequency({"osc": osc}),
          "md2tp_histogram": {"mean": md2tp_mean}}


def test_summary_rows_against_numpy():
  from talr_optax.demo import runner  # pylint: disable=import-outside-toplevel
  osc = list(np.linspace(0.0, 1.0, 25))  # the last 10 %: int(2.5) = 2 steps
  K, R = [1.0] * 10, [0.5] * 10  # warm-up: the first step is left out
  K[0] = 100.0
  runs = [_record(1, "talr", 0, 0.5, osc, K, R, 0.25), _record(2, "sgd", 0, 0.9, osc, K, R, 0.1),
          _record(2, "sgd", 1, 0.7, osc[:10], K, R, 0.3), _record(2, "talr", 0, 0.8, osc, K, R, 0.2)]
  assert runs[0]["tracking_error"] == pytest.approx(1.0)  # |1 - 0.5| / 0.5
  assert runs[0]["late_oscillation_frequency"] == pytest.approx(np.mean(osc[-2:]))
  assert runs[2]["late_oscillation_frequency"] == osc[9]  # at least one step
  score = runner.Score("accuracy", "final_test_accuracy", "acc", scale=100.0)
  rows = runner.summarize(runs, score, descending_bits=True)
  assert [(r["bits"], r["method"], r["seeds"]) for r in rows] == [
      (2, "sgd", 2), (2, "talr", 1), (1, "talr", 1)]
  assert rows[0]["accuracy_mean"] == pytest.approx(80.0)
  assert rows[0]["accuracy_std"] == pytest.approx(np.std([90.0, 70.0]))
  assert rows[0]["late_oscillation_frequency_mean"] == pytest.approx(
      np.mean([np.mean(osc[-2:]), osc[9]]))
  assert rows[0]["md2tp_mean"] == pytest.approx(0.2)
  assert [r["bits"] for r in runner.summarize(runs, score)] == [1, 2, 2]
  assert "learning_rate" not in rows[0]


def test_progress_in_a_file_prints_plain_lines(capsys):
  from talr_optax.demo import runner  # pylint: disable=import-outside-toplevel
  with runner.Progress(120, "steps") as progress:
    progress.describe("W2: seed 0")
    progress.advance(50)  # no status: no line
    progress.advance(10, "step 60/100")
  assert capsys.readouterr().out.splitlines() == [
      "[  0/120 steps] W2: seed 0", "[ 60/120 steps] W2: seed 0: step 60/100"]


def test_train_arm_refuses_what_a_task_does_not_do():
  from talr_optax.demo import runner  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"method must be one of \('sgd', 'talr'\), got 'adam'"):
    demo.train_arm("digits", None, None, None, bits=2, seed=0, method="adam")
  with pytest.raises(ValueError, match="lr_scale must be 1 on the image tasks"):
    demo.train_arm("digits", None, None, None, bits=2, seed=0, method="sgd", lr_scale=3.0)
  with pytest.raises(ValueError, match="task must be 'digits' or 'lm', got 'cifar'"):
    demo.task_of("cifar")
  # The runner takes the task itself: it imports no task module to look a name up.
  with pytest.raises(TypeError, match=r"task must be a TaskDef .*got 'digits'.*"
                                      r"talr_optax\.demo\.task_of"):
    runner.train_arm("digits", None, None, None, bits=2, seed=0, method="sgd")
  with pytest.raises(TypeError, match="task must be a TaskDef"):
    runner.run("lm", None)
  assert demo.task_of("digits").name == "digits"


def _opt_states(opt_state):
  """The TALR and monitor states inside an optimizer state."""
  import talr_optax as talr  # pylint: disable=import-outside-toplevel
  kinds = (talr.ScaleByTALRState, talr.TrackTransitionsState)
  leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds))
  return [x for x in leaves if isinstance(x, kinds)]


def _is_oscillation_state(x) -> bool:
  import talr_optax as talr  # pylint: disable=import-outside-toplevel
  return isinstance(x, talr.TrackOscillationsState)


@pytest.mark.parametrize("method", ["talr", "sgd"])
def test_sample_size_reaches_the_optimizer_state(method):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  from talr_optax.counting import sample_strides  # pylint: disable=import-outside-toplevel
  from talr_optax.demo import optim  # pylint: disable=import-outside-toplevel
  assert demo.config_from_args([]).sample_size is None
  shapes = {}
  for argv in ([], ["--sample-size", "64"]):
    cfg = demo.config_from_args(argv)
    model = make_model(cfg, 2, 0, 10)
    # As the demo does: track_oscillations' init traces levels_fn, which needs
    # calibrated step sizes (scale_by_talr's init would take fresh ones).
    tnnx.calibrate(model, jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)),
                                      jnp.float32))
    optimizer = nnx.Optimizer(model, optim.qat(cfg, model, method, 2, 100), wrt=nnx.Param)
    (state,) = _opt_states(optimizer.opt_state)
    assert state.rate_names.names == ("conv2/kernel", "conv3/kernel")
    shapes[cfg.sample_size] = {
        name: tuple(state.prev_levels[name]["kernel"].shape) for name in ("conv2", "conv3")}
    # The oscillation monitor follows the same weights.
    (osc,) = [x for x in jax.tree.leaves(optimizer.opt_state, is_leaf=_is_oscillation_state)
              if _is_oscillation_state(x)]
    assert {name: tuple(osc.last_direction[name]["kernel"].shape)
            for name in ("conv2", "conv3")} == shapes[cfg.sample_size]
  assert shapes[None] == {"conv2": (3, 3, 16, 32), "conv3": (3, 3, 32, 32)}
  for name, full in shapes[None].items():
    grid = tuple(-(-d // s) for d, s in zip(full, sample_strides(full, 64)))
    assert shapes[64][name] == grid and np.prod(grid) <= 64


def test_batch_size_above_the_training_set_stops_before_training(tmp_path, capsys):
  out = tmp_path / "out"
  err = _exit_message(TINY + ["--batch-size", "1438", "--out", str(out)], capsys)
  assert "argument --batch-size: must be an integer in [1, 1437] (the size of the digits " \
         "training set), got 1438" in err
  assert not out.exists()


def test_missing_cifar_dir_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
  out = tmp_path / "out"
  code = demo.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"),
                    "--out", str(out)])
  assert code == 1
  assert "data_batch_1" in capsys.readouterr().err
  assert not out.exists()


# ---------------------------------------------------------------------------
# --checkpoint-dir: configuration, lock


@pytest.mark.parametrize("content", [b"{\"epochs\": 3,", b"\xff\xfe", b"[1, 2]"],
                         ids=["truncated", "binary", "not_an_object"])
def test_corrupt_config_json_is_named(tmp_path, content, capsys):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_bytes(content)
  err = _exit_message(["--quick", "--checkpoint-dir", str(ckpt)], capsys)
  assert f"{ckpt / 'config.json'} is corrupt" in err


def test_checkpoint_dir_of_another_configuration_is_refused(tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  with demo.RunStore(demo.config_from_args(["--quick", "--epochs", "3",
                                            "--checkpoint-dir", str(ckpt)])):
    pass
  assert json.loads((ckpt / "config.json").read_text())["epochs"] == 3
  err = _exit_message(["--quick", "--epochs", "4", "--checkpoint-dir", str(ckpt)], capsys)
  assert "holds runs of another configuration (epochs 3 there, 4 here)" in err
  # Seeds, bit widths and --out may change between runs of one directory.
  demo.config_from_args(["--quick", "--epochs", "3", "--seeds", "2", "--bits", "4",
                         "--out", str(tmp_path / "x"), "--checkpoint-dir", str(ckpt)])


def test_one_demo_at_a_time_per_checkpoint_dir(tmp_path):
  cfg = demo.config_from_args(["--quick", "--checkpoint-dir", str(tmp_path / "ckpt")])
  with demo.RunStore(cfg):
    with pytest.raises(ValueError, match=rf"in use by another demo run \(process {os.getpid()}\)"):
      demo.RunStore(cfg)
  with demo.RunStore(cfg):  # free again once the first one is closed
    pass


# ---------------------------------------------------------------------------
# End to end


def _assert_results(out: Path, results: dict, epochs: int) -> None:
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk["runs"] == json.loads(json.dumps(results["runs"]))
  assert sorted(r["method"] for r in results["runs"]) == ["sgd", "talr"]
  for run in results["runs"]:
    n = len(run["trace"]["k"])
    assert n == 44 * epochs  # 1437 training images // 32
    assert all(len(run["trace"][key]) == n for key in ("K", "R", "U", "lr", "loss", "osc"))
    # The oscillation monitor runs in both arms: a frequency in [0, 1] that moves.
    assert all(0.0 <= f <= 1.0 for f in run["trace"]["osc"]) and max(run["trace"]["osc"]) > 0
    assert len(run["test_accuracy_per_epoch"]) == epochs
    assert 0.5 <= run["final_test_accuracy"] <= 1.0
    assert all(0.0 <= k <= 1.0 for k in run["trace"]["k"])
    # Both K curves start from R_0 = 5e-3 * sqrt(2) and move towards k.
    assert abs(run["trace"]["K"][0] - R0) < 1e-3
    # Both log the cosine target from R_0 that TALR follows, after each update.
    np.testing.assert_allclose(run["trace"]["R"], _cosine(R0, n, np.arange(1, n + 1)),
                               rtol=1e-5, atol=1e-9)
  talr_run = next(r for r in results["runs"] if r["method"] == "talr")
  assert talr_run["trace"]["U"] != talr_run["trace"]["lr"]
  # The final TALR model is exported; its integer forward scores what QAT scored.
  export = talr_run["export"]
  assert export["integer_score"] == export["qat_score"] == talr_run["final_test_accuracy"]
  assert export["export_packed_bytes"] < export["export_bytes"] < export["float_state_bytes"]
  assert "export" not in next(r for r in results["runs"] if r["method"] == "sgd")
  assert {row["method"] for row in results["summary"]} == {"sgd", "talr"}
  for name in ("rate_tracking", "learning_rates", "accuracy", "weight_changes", "oscillations"):
    png = out / f"{name}.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


def assert_readable_in_a_file(printed: str, rows: int) -> None:
  """No bar redraws or colour codes, and each table row whole on one line."""
  assert "\r" not in printed and "\x1b" not in printed
  lines = printed.splitlines()
  # A progress bar's glyphs appear in the tables' header borders only.
  assert all(line.lstrip()[0] in "┏┡" for line in lines if "━" in line)
  # Row lines of the summary: all 8 cells (bits ... md2tp) between the borders.
  cells = [line.split("│")[1:-1] for line in lines if "±" in line and "│" in line]
  assert len(cells) == rows and all(len(c) >= 7 and all(x.strip() for x in c) for c in cells)
  assert any(line.startswith("md2tp: distance of a quantized weight") for line in lines)
  assert any(line.startswith("late osc. freq.: mean oscillation frequency") for line in lines)


def test_tiny_run_and_its_resume_from_checkpoint_dir_are_bit_identical(tmp_path, monkeypatch,
                                                                        capsys):
  pytest.importorskip("orbax.checkpoint")
  argv = TINY
  capsys.readouterr()
  straight = demo.run(demo.config_from_args(argv + ["--out", str(tmp_path / "a")]))
  _assert_results(tmp_path / "a", straight, epochs=2)
  printed = capsys.readouterr().out
  assert_readable_in_a_file(printed, rows=2)
  # docs/serving.md quotes the export line of --quick, whose model this run
  # trains: the same words, and the same byte counts (the scores differ).
  (export,) = [line for line in printed.splitlines() if line.startswith("export W2 seed 0")]
  quoted = quoted_line("docs/serving.md", "58,490 bytes", "export W2 seed 0")
  assert shape(export) == shape(quoted), (export, quoted)
  assert numbers(export.split(";")[0]) == numbers(quoted.split(";")[0]), (export, quoted)
  # Progress in a file: one plain line per epoch, the last one at the total.
  progress = [line for line in printed.splitlines() if line.startswith("[")]
  assert progress[-1].startswith("[5/5 epochs] seed 0 W2A2  SGDT: epoch 2/2 loss ")
  assert len([line for line in progress if ": epoch " in line]) == 4
  for name in ("results.json", "rate_tracking.png"):
    assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) & 0o644 == 0o644, name
  assert stat.S_IMODE((tmp_path / "a" / "results.json").stat().st_mode) == 0o644

  ckpt = tmp_path / "ckpt"
  cfg = demo.config_from_args(argv + ["--out", str(tmp_path / "b"),
                                      "--checkpoint-dir", str(ckpt)])
  # Interrupted in epoch 2 of SGD; then SGD resumes and ends, TALR is
  # interrupted in its epoch 2; then TALR resumes.
  with pytest.raises(demo.Interrupted):
    demo.run(cfg, interrupt_after=1)
  assert sorted(os.listdir(ckpt / "seed0_w2_sgd" / "epochs")) == ["1"]
  with pytest.raises(demo.Interrupted):
    demo.run(cfg, interrupt_after=1)
  assert stat.S_IMODE((ckpt / "seed0_w2_sgd" / "record.json").stat().st_mode) == 0o644
  assert sorted(os.listdir(ckpt / "seed0_w2_talr" / "epochs")) == ["1"]
  assert not (tmp_path / "b" / "results.json").exists()
  resumed = demo.run(cfg)
  assert resumed["runs"] == straight["runs"]
  # A finished demo is read back from its records, not trained again.
  def no_training(*args, **kwargs):
    raise AssertionError("trained again")

  monkeypatch.setattr(demo_train, "run_qat", no_training)
  monkeypatch.setattr(demo_train, "pretrain_full_precision", no_training)
  assert demo.run(cfg)["runs"] == resumed["runs"]


def test_mobilenet_tiny_run_counts_on_the_sampled_grid(tmp_path, monkeypatch):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from talr_optax.demo import optim  # pylint: disable=import-outside-toplevel
  built = []
  qat = optim.qat

  def recording_qat(cfg, model, method, bits, total_steps):
    built.append((method, model, qat(cfg, model, method, bits, total_steps)))
    return built[-1][2]

  monkeypatch.setattr(optim, "qat", recording_qat)
  cfg = demo.config_from_args(TINY + ["--model", "mobilenet", "--sample-size", "64",
                                      "--out", str(tmp_path)])
  assert (cfg.model, cfg.sample_size) == ("mobilenet", 64)
  # One TALR run from a briefly pretrained model: the baseline's monitor and the
  # whole demo (figures, store) are covered with the SmallCNN, at a third of the
  # compile time of MobileNet.
  task = TASKS[cfg.dataset]
  dataset = task.load(cfg)
  fp_model = demo_train.pretrain_full_precision(cfg, task, dataset, 0)
  record = demo_train.run_qat(cfg, task, dataset, fp_model, 2, 0, "talr")
  assert len(record["trace"]["k"]) == 2 * 44 and 0 < max(record["trace"]["k"]) <= 1
  assert 0.2 <= record["final_test_accuracy"] <= 1.0  # 10 classes: 0.1 by chance
  ((method, model, tx),) = built
  # The state's layout from shapes alone (an eager init recompiles every op).
  (state,) = _opt_states(jax.eval_shape(tx.init, nnx.state(model, nnx.Param)))
  names = state.rate_names.names
  # Depthwise, expand and project convs of the four blocks (the first has no
  # expand conv) and the last 1x1 conv; the stem and the classifier stay FP.
  assert method == "talr" and len(names) == 12
  assert {"blocks/0/depthwise/kernel", "blocks/0/project/kernel", "blocks/3/expand/kernel",
          "conv_last/kernel"} <= set(names)
  prev = [x for x in jax.tree.leaves(state.prev_levels) if x is not None]
  assert len(prev) == 12 and all(x.size <= 64 for x in prev)
  # A depthwise kernel (3, 3, 1, 64) is counted on a (3, 1, 1, 16) grid.
  assert state.prev_levels["blocks"][2]["depthwise"]["kernel"].shape == (3, 1, 1, 16)


def _write_tiny_cifar(directory: Path, n_train: int = 24, n_test: int = 16) -> None:
  """A miniature CIFAR-10 in the python-pickle layout (random pixels)."""
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    n = n_test if name == "test_batch" else n_train
    with open(directory / name, "wb") as f:
      pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   b"labels": rng.integers(0, 10, n).tolist()}, f)


def test_cifar10_resnet20_task_trains_on_a_tiny_fixture(tmp_path, capsys):
  data_dir = tmp_path / "cifar"
  data_dir.mkdir()
  _write_tiny_cifar(data_dir)
  argv = ["--dataset", "cifar10", "--data-dir", str(data_dir), "--bits", "2", "--epochs", "1",
          "--out", str(tmp_path / "out")]
  err = _exit_message(argv + ["--batch-size", "121"], capsys)
  assert "[1, 120] (the size of the cifar10 training set), got 121" in err
  # One TALR run from an untrained model: the whole demo would compile
  # ResNet-20 three times (pretraining, baseline, TALR), which adds nothing.
  cfg = demo.config_from_args(argv + ["--batch-size", "40"])
  task = TASKS[cfg.dataset]
  dataset = task.load(cfg)
  assert dataset.train.images.shape == (120, 32, 32, 3)
  fp_model = make_model(cfg, None, 0, dataset.num_classes)
  record = demo_train.run_qat(cfg, task, dataset, fp_model, 2, 0, "talr")
  # 120 training images / batch 40 = 3 steps per epoch.
  assert len(record["trace"]["k"]) == 3 and len(record["test_accuracy_per_epoch"]) == 1
  np.testing.assert_allclose(record["trace"]["R"], _cosine(R0, 3, np.arange(1, 4)),
                             rtol=1e-5, atol=1e-9)
  assert 0 < max(record["trace"]["k"]) <= 1


def test_the_library_never_imports_the_demo():
  package = ROOT / "talr_optax"
  library = [p for p in package.rglob("*.py") if p.relative_to(package).parts[0] != "demo"]
  assert len(library) > 10
  pattern = re.compile(r"talr_optax\.demo|from talr_optax import .*\bdemo\b|from \.+ import demo")
  assert [str(p) for p in library if pattern.search(p.read_text())] == []


def _demo_imports() -> dict[str, set[str]]:
  """``{module: demo modules it imports}`` over ``talr_optax/demo/*.py``.

  Counts ``import`` statements at any depth (module level, in functions, under
  ``TYPE_CHECKING``), relative ones too, and ``importlib.import_module`` of a
  literal name. The package's own ``__init__`` (run first by every submodule
  import) is left out of the edges: its lazy exports point down, never back.
  """
  package = ROOT / "talr_optax" / "demo"
  names = {p.stem for p in package.glob("*.py")} - {"__init__"}

  def demo_module(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[:2] == ["talr_optax", "demo"] and len(parts) > 2 and parts[2] in names:
      return parts[2]
    return None

  graph = {}
  for path in sorted(package.glob("*.py")):
    targets = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets += [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative to talr_optax.demo (level 1) or above
          parent = ["talr_optax", "demo"][:3 - node.level]
          base = ".".join(parent + ([base] if base else []))
        targets += [base] + [f"{base}.{a.name}" for a in node.names]
      elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant)):
        targets.append(str(node.args[0].value))
    graph[path.stem] = {m for t in targets if (m := demo_module(t))} - {path.stem}
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
  done, path = set(), []

  def visit(node: str) -> list[str] | None:
    if node in path:
      return path[path.index(node):] + [node]
    if node in done:
      return None
    path.append(node)
    for child in sorted(graph.get(node, ())):
      if found := visit(child):
        return found
    path.pop()
    done.add(node)
    return None

  for node in sorted(graph):
    if found := visit(node):
      return found
  return None


def test_cycle_finder_names_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_demo_has_no_import_cycle():
  graph = _demo_imports()
  # The parse sees imports at every level: the tasks use the runner, the
  # entry point reaches the command line.
  assert {"runner", "train"} <= graph["runs"] and "runner" in graph["lm_train"]
  assert graph["__main__"] == {"cli"}
  cycle = _cycle(graph)
  assert cycle is None, f"import cycle in talr_optax/demo: {' -> '.join(cycle)}"


def test_help_imports_none_of_the_demo_extra():
  # --help parses every flag's text but runs nothing: no Flax, no plotting.
  code = ("import sys\nfrom talr_optax.demo import cli\ntry:\n  cli.main(['--help'])\n"
          "except SystemExit:\n  pass\n"
          "print(sorted(m for m in ('flax', 'matplotlib', 'rich', 'sklearn', 'orbax') "
          "if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "usage: python -m talr_optax.demo" in proc.stdout
  assert proc.stdout.splitlines()[-1] == "[]"
