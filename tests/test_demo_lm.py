"""The language-model task of the demo (``--task lm``): data, flags, a tiny end-to-end run."""

import hashlib
import json
import re
import stat
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

from talr_optax import demo  # pylint: disable=g-import-not-at-top
from talr_optax.demo import lm_config, lm_data  # pylint: disable=g-import-not-at-top


# ---------------------------------------------------------------------------
# Data


def _write_library(directory, n=25):
  """``n`` small modules with different contents, plus files that must be skipped."""
  for i in range(n):
    (directory / f"mod{i:02d}.py").write_bytes(f"x = {i}\n".encode() * (i + 1))
  (directory / "notes.txt").write_text("not python")
  (directory / "package").mkdir()
  (directory / "package" / "inner.py").write_text("not top level")


def test_split_holds_out_every_tenth_file_and_hashes_the_bytes(tmp_path):
  _write_library(tmp_path)
  files = lm_data.stdlib_files(tmp_path)
  assert [p.rsplit("/", 1)[-1] for p in files] == [f"mod{i:02d}.py" for i in range(25)]
  corpus = lm_data.load_stdlib(directory=tmp_path)
  val_ids, train_ids = [9, 19], [i for i in range(25) if i not in (9, 19)]
  read = lambda ids: b"".join((tmp_path / f"mod{i:02d}.py").read_bytes() for i in ids)
  assert corpus.val.tobytes() == read(val_ids) and corpus.train.tobytes() == read(train_ids)
  facts = corpus.facts
  assert (facts["files"], facts["train_files"], facts["val_files"]) == (25, 23, 2)
  assert facts["val_sha256"] == hashlib.sha256(read(val_ids)).hexdigest()
  assert facts["train_bytes"] == len(read(train_ids))
  assert facts["python"] == ".".join(map(str, sys.version_info[:3]))
  # A change of one byte changes the hash.
  (tmp_path / "mod19.py").write_bytes(b"y" + (tmp_path / "mod19.py").read_bytes()[1:])
  assert lm_data.load_stdlib(directory=tmp_path).facts["val_sha256"] != facts["val_sha256"]


def test_the_standard_library_split_is_deterministic():
  a, b = lm_data.load_stdlib(), lm_data.load_stdlib()
  assert a.facts == b.facts
  assert a.facts["files"] > 50 and a.facts["val_files"] == a.facts["files"] // 10
  assert a.facts["train_bytes"] > 9 * a.facts["val_bytes"] / 2
  np.testing.assert_array_equal(lm_data.fixed_windows(a.val, 65, 16),
                                lm_data.fixed_windows(b.val, 65, 16))


def test_windows_are_contiguous_and_in_range():
  data = np.arange(100, dtype=np.uint8)
  batch = lm_data.random_windows(data, 10, 32, np.random.default_rng(0))
  assert batch.shape == (32, 10) and batch.dtype == np.int32
  np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
  fixed = lm_data.fixed_windows(data, 10, 4)
  np.testing.assert_array_equal(fixed[:, 0], [0, 30, 60, 90])


def test_a_split_shorter_than_one_window_is_an_error(tmp_path):
  _write_library(tmp_path)
  with pytest.raises(ValueError, match="validation split .* fewer than the 1000 one window"):
    lm_data.load_stdlib(directory=tmp_path, min_bytes=1000)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"no \*\.py file in .*empty"):
    lm_data.stdlib_files(tmp_path / "empty")


# ---------------------------------------------------------------------------
# Flags


def _exit_message(argv, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    demo.main(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--task", "nlp"], "--task"),
    (["--task", "lm", "--steps", "0"], r"--steps must be an integer >= 1, got --steps = 0"),
    (["--task", "lm", "--width", "x"], r"--width must be an integer >= 1, got --width = 'x'"),
    (["--task", "lm", "--heads", "3"], r"--heads must divide --width, got --width = 64"),
    (["--task", "lm", "--lr", "-1"], r"--lr must be in \(0, 1\]"),
    (["--task", "lm", "--ema-momentum", "1"], r"--ema-momentum must be in \[0, 1\)"),
    (["--task", "lm", "--baseline-lrs", "1,x"], "--baseline-lrs must be a comma-separated"),
    (["--task", "lm", "--baseline-lrs", "3,3"], "--baseline-lrs must not repeat"),
    (["--task", "lm", "--epochs", "3"], "--epochs is not used with --task lm"),
    (["--task", "lm", "--dataset", "cifar10"], "--dataset is not used with --task lm"),
    (["--task", "lm", "--optimizer", "adam"], "--optimizer is not used with --task lm"),
    (["--task", "lm", "--checkpoint-dir", "x"], "--checkpoint-dir is not used with --task lm"),
    (["--steps", "100"], "--steps is used with --task lm only"),
    (["--task", "digits", "--baseline-lrs", "1,3"], "--baseline-lrs is used with --task lm"),
])
def test_bad_lm_flags_exit_2_naming_the_flag(argv, match, capsys):
  err = _exit_message(argv, capsys)
  assert re.search(match, err), err


def test_activation_estimate_follows_its_formula():
  cfg = lm_config.LMConfig(batch_size=3, context=5, width=8, layers=2, heads=2, eval_windows=4)
  per_layer = 20 * 8 + 2 * 2 * 5  # kept per position and layer: 20 widths, 2 heads x context
  head = 2 * 8 + 3 * 256  # embeddings and logits
  train = 2 * 3 * 5 * (2 * per_layer + head)  # doubled for the backward pass
  evaluation = 4 * 5 * (per_layer + head)  # 4 windows forward, one layer at a time
  assert lm_config.activation_bytes(cfg) == 4 * max(train, evaluation)
  # Evaluation dominates with a long context and a batch of 1: 128 windows at a time.
  long = lm_config.LMConfig(batch_size=1, context=4096)
  assert lm_config.activation_bytes(long) == 4 * 128 * 4096 * (20 * 64 + 2 * 2 * 4096 + 2 * 64
                                                               + 3 * 256)


def test_sizes_beyond_memory_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
  out = tmp_path / "out"
  err = _exit_message(["--task", "lm", "--batch-size", "100000", "--context", "100000",
                       "--out", str(out)], capsys)
  assert re.search(r"--batch-size 100000 with --context 100000 \(--width 64, --layers 2, "
                   r"--heads 2\) needs about [\d.]+ GiB of activations, more than this "
                   r"machine's [\d.]+ GiB of memory; lower --batch-size or --context", err), err
  # The limit is the machine's memory: the defaults pass, and fail below their need.
  cfg = demo.config_from_args(["--task", "lm"])
  monkeypatch.setattr(lm_config, "memory_bytes", lambda: lm_config.activation_bytes(cfg) - 1)
  err = _exit_message(["--task", "lm"], capsys)
  assert "--batch-size 16 with --context 64" in err
  monkeypatch.setattr(lm_config, "memory_bytes", lambda: lm_config.activation_bytes(cfg))
  assert demo.config_from_args(["--task", "lm"]) == cfg
  assert not out.exists()


def test_lm_defaults_quick_and_shared_flags():
  cfg = demo.config_from_args(["--task", "lm"])
  assert cfg == lm_config.LMConfig()
  assert (cfg.bits, cfg.seeds, cfg.out, cfg.baseline_lrs) == ((2, 4), 3, "runs/lm",
                                                              (1.0, 3.0, 10.0, 30.0))
  quick = demo.config_from_args(["--task", "lm", "--quick"])
  assert (quick.bits, quick.seeds, quick.steps) == ((2,), 1, lm_config.QUICK["steps"])
  cfg = demo.config_from_args(["--task", "lm", "--quick", "--bits", "3", "--seeds", "2",
                               "--steps", "7", "--lam", "0.01", "--baseline-lrs", "0.5,2,8",
                               "--sample-size", "64", "--out", "somewhere"])
  assert (cfg.bits, cfg.seeds, cfg.steps, cfg.lam, cfg.baseline_lrs, cfg.sample_size,
          cfg.out) == ((3,), 2, 7, 0.01, (0.5, 2.0, 8.0), 64, "somewhere")
  assert demo.config_from_args([]).out == "runs/demo"  # digits keeps its default


# ---------------------------------------------------------------------------
# End to end

TINY = ["--task", "lm", "--quick", "--steps", "24", "--fp-steps", "16", "--eval-every", "8",
        "--width", "16", "--heads", "2", "--context", "16", "--batch-size", "8", "--seeds", "2"]


def test_tiny_lm_run_writes_results_and_figures(tmp_path, capsys):
  out = tmp_path / "out"
  assert demo.main(TINY + ["--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "Baseline learning-rate sweep" in printed and "AdamWT" in printed
  from test_demo import assert_readable_in_a_file  # pylint: disable=import-outside-toplevel
  assert_readable_in_a_file(printed, rows=2)
  # Titles on their own line, whole.
  assert any(line.startswith("QAT of a byte-level transformer on the stdlib, 24 steps, "
                             "validation bits per byte over seeds (full precision: ")
             for line in printed.splitlines())
  assert stat.S_IMODE((out / "results.json").stat().st_mode) == 0o644
  results = json.loads((out / "results.json").read_text())
  rows = results["summary"]
  assert [(r["bits"], r["method"], r["seeds"]) for r in rows] == [(2, "sgd", 2), (2, "talr", 2)]
  for row in rows:
    for key in ("bits_per_byte_mean", "bits_per_byte_std", "tracking_error_mean",
                "late_oscillation_frequency_mean"):
      assert np.isfinite(row[key]), key
    assert 0 < row["bits_per_byte_mean"] < 8.5
  # The sweep ran on seed 0 only; the chosen rate is the best one, and the
  # baseline runs of every seed use it.
  sweep = results["sweep"]
  assert [r["lr_scale"] for r in sweep] == [1.0, 3.0, 10.0, 30.0]
  assert {r["seed"] for r in sweep} == {0}
  best = min(sweep, key=lambda r: r["final_bits_per_byte"])
  assert [r["chosen"] for r in sweep] == [r is best for r in sweep]
  baselines = [r for r in results["runs"] if r["method"] == "sgd"]
  assert [r["lr_scale"] for r in baselines] == [best["lr_scale"]] * 2
  assert rows[0]["learning_rate"] == pytest.approx(3e-4 * best["lr_scale"])
  for run in results["runs"]:
    trace = run["trace"]
    assert all(len(trace[key]) == 24 for key in ("k", "K", "R", "U", "lr", "loss", "osc"))
    assert run["evals"]["step"] == [8, 16, 24]
    # One rate per layer and quantized kernel: 6 kernels x 2 layers.
    assert len(run["groups"]) == 12 and "blocks/mlp/up/kernel[1]" in run["groups"]
  talr_run = next(r for r in results["runs"] if r["method"] == "talr")
  assert talr_run["trace"]["U"] != talr_run["trace"]["lr"]
  # Every TALR run is exported; its integer forward has the QAT model's bits per byte.
  for run in results["runs"]:
    if run["method"] == "talr":
      export = run["export"]
      assert export["qat_score"] == run["final_bits_per_byte"]
      assert export["integer_score"] == pytest.approx(export["qat_score"], rel=1e-5)
      assert export["export_packed_bytes"] < export["export_bytes"] < export["float_state_bytes"]
  assert printed.count("export W2 seed") == 2
  # docs/serving.md quotes the export line of --task lm --quick: the same words
  # (this tiny model has other byte counts and scores).
  from _doc_quotes import quoted_line, shape  # pylint: disable=import-outside-toplevel
  quoted = quoted_line("docs/serving.md", "544,316 bytes", "export W2 seed 0")
  for line in printed.splitlines():
    if line.startswith("export W2 seed"):
      assert shape(line) == shape(quoted), (line, quoted)
  assert all("U" in g for g in talr_run["groups"].values())
  scale = baselines[0]["lr_scale"]
  np.testing.assert_allclose(baselines[0]["trace"]["lr"],
                             scale * np.asarray(talr_run["trace"]["lr"]), rtol=1e-6)
  assert results["data"]["val_files"] == results["data"]["files"] // 10
  assert results["model"]["W2"]["quantized_parameters"] == 2 * 12 * 16 * 16
  assert len(results["pretraining"]["evals"]["step"]) == 2
  for name in ("rate_tracking", "learning_rates", "bits_per_byte", "weight_changes",
               "oscillations", "lr_sweep"):
    png = out / f"{name}.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000, name


@pytest.mark.parametrize("method", ["sgd", "talr"])
def test_both_arms_count_one_rate_per_layer_on_the_sampled_grid(method):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import talr_optax as talr  # pylint: disable=import-outside-toplevel
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  from talr_optax.demo import lm_train  # pylint: disable=import-outside-toplevel

  cfg = lm_config.LMConfig(context=8, width=16, heads=2, sample_size=32)
  model = lm_train.make_model(cfg, 2, 0)
  tnnx.calibrate(model, jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)),
                                    jnp.int32))
  arm = lm_train.Arm(method, 2, 10, cfg.lr, sample_size=cfg.sample_size)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  state = jax.eval_shape(lm_train.optimizer(arm, model).init, params)
  kinds = (talr.ScaleByTALRState, talr.TrackTransitionsState, talr.TrackOscillationsState)
  found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
           if isinstance(x, kinds)]
  rates = {"sgd": talr.TrackTransitionsState, "talr": talr.ScaleByTALRState}[method]
  assert [type(x) for x in found] == [rates, talr.TrackOscillationsState]
  counted, oscillation = found
  assert len(counted.rate_names.names) == 12 and "blocks/mlp/down/kernel[1]" in (
      counted.rate_names.names)
  assert counted.rate_names == oscillation.rate_names
  # Each layer of the (2, 16, 64) up kernel is counted on at most 32 weights.
  up = counted.prev_levels["blocks"]["mlp"]["up"]["kernel"].shape
  assert up[0] == 2 and np.prod(up[1:]) <= 32
  assert oscillation.last_direction["blocks"]["mlp"]["up"]["kernel"].shape == up


def test_train_arm_of_the_lm_task_for_a_study():
  from talr_optax import demo  # pylint: disable=import-outside-toplevel
  task = demo.task_of("lm")
  cfg = lm_config.LMConfig(steps=8, fp_steps=4, eval_every=4, eval_windows=8, width=16,
                           context=16, batch_size=4)
  data = task.load(cfg)
  fp_model = task.pretrain(cfg, data, 0, None)
  record = demo.train_arm("lm", cfg, data, fp_model, bits=2, seed=1, method="sgd",
                          lr_scale=3.0)
  assert (record["bits"], record["seed"], record["method"]) == (2, 1, "sgd")
  assert record["evals"]["step"] == [4, 8]
  assert record["final_bits_per_byte"] == record["evals"]["bits_per_byte"][-1]
  trace = record["trace"]
  assert all(len(trace[key]) == 8 for key in ("k", "K", "R", "U", "lr", "loss", "osc"))
  # The baseline's learning rate: lr_scale times the cosine from cfg.lr, after each update.
  step = np.arange(1, 9)
  np.testing.assert_allclose(trace["lr"], 3.0 * 3e-4 * (1 + np.cos(np.pi * step / 8)) / 2,
                             rtol=1e-5, atol=1e-12)  # a float32 schedule
  assert record["learning_rate"] == pytest.approx(9e-4)
  assert record["late_oscillation_frequency"] == trace["osc"][-1]  # 10 % of 8 steps: 1
