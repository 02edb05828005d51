"""The demo CLI: argument errors and a tiny end-to-end run."""

import json

import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from talr_optax import demo  # pylint: disable=g-import-not-at-top


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--bits", "5"], "--bits"),
        (["--bits", "two"], "--bits"),
        (["--seeds", "0"], "--seeds"),
        (["--epochs", "-3"], "--epochs"),
        (["--rule", "exp"], "--rule"),
        (["--optimizer", "lion"], "--optimizer"),
        (["--dataset", "cifar10"], "--data-dir"),
        (["--model", "resnet20"], "resnet20"),
        (["--lam", "0"], "--lam"),
    ],
)
def test_bad_arguments_exit_with_a_message_naming_them(argv, match, capsys):
  with pytest.raises(SystemExit) as e:
    demo.config_from_args(argv)
  assert e.value.code == 2
  assert match in capsys.readouterr().err


def test_quick_defaults():
  cfg = demo.config_from_args(["--quick"])
  assert cfg.seeds == 1 and cfg.bits == (2, 1) and cfg.model == "cnn"
  cfg = demo.config_from_args(["--dataset", "cifar10", "--data-dir", "x"])
  assert cfg.model == "resnet20" and cfg.batch_size == 256


def test_missing_cifar_dir_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
  out = tmp_path / "out"
  code = demo.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"),
                    "--out", str(out)])
  assert code == 1
  assert "data_batch_1" in capsys.readouterr().err
  assert not out.exists()


def test_end_to_end_tiny_run_writes_results_and_figures(tmp_path):
  out = tmp_path / "demo"
  code = demo.main(["--quick", "--bits", "2", "--epochs", "2", "--fp-epochs", "1",
                    "--out", str(out)])
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  methods = sorted(r["method"] for r in results["runs"])
  assert methods == ["sgd", "talr"]
  for run in results["runs"]:
    n = len(run["trace"]["k"])
    assert n > 0 and all(len(run["trace"][key]) == n for key in ("K", "R", "U", "lr", "loss"))
    assert len(run["test_accuracy_per_epoch"]) == 2
    assert 0.0 <= run["final_test_accuracy"] <= 1.0
    assert all(0.0 <= k <= 1.0 for k in run["trace"]["k"])
  talr_run = next(r for r in results["runs"] if r["method"] == "talr")
  # The target TALR logs is the cosine schedule from R_0 = 5e-3 * sqrt(2).
  assert talr_run["trace"]["R"][0] == pytest.approx(5e-3 * 2**0.5, rel=1e-5)
  assert {row["method"] for row in results["summary"]} == {"sgd", "talr"}
  for name in ("rate_tracking", "learning_rates", "accuracy", "weight_changes"):
    png = out / f"{name}.png"
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_resume_from_checkpoint_dir_is_bit_identical(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  argv = ["--quick", "--bits", "2", "--epochs", "3", "--fp-epochs", "1"]
  straight = demo.run(demo.config_from_args(argv + ["--out", str(tmp_path / "a")]))

  ckpt = tmp_path / "ckpt"
  cfg = demo.config_from_args(argv + ["--out", str(tmp_path / "b"),
                                      "--checkpoint-dir", str(ckpt)])
  with pytest.raises(demo._Interrupted):  # pylint: disable=protected-access
    demo.run(cfg, stop_after_epoch=2)
  assert not (tmp_path / "b" / "results.json").exists()
  assert any(ckpt.glob("seed0_w2_sgd/epochs/*"))
  resumed = demo.run(cfg)
  for a, b in zip(sorted(straight["runs"], key=lambda r: r["method"]),
                  sorted(resumed["runs"], key=lambda r: r["method"])):
    assert a["method"] == b["method"]
    assert a["trace"] == b["trace"]
    assert a["test_accuracy_per_epoch"] == b["test_accuracy_per_epoch"]
  # A finished demo is read back from its records, not trained again.
  again = demo.run(cfg)
  assert [r["trace"] for r in again["runs"]] == [r["trace"] for r in resumed["runs"]]


def test_checkpoint_dir_of_another_configuration_is_refused(tmp_path):
  ckpt = tmp_path / "ckpt"
  demo.RunStore(ckpt, demo.config_from_args(["--quick", "--epochs", "3"]))
  with pytest.raises(ValueError, match="another configuration.*epochs"):
    demo.RunStore(ckpt, demo.config_from_args(["--quick", "--epochs", "4"]))


def _write_tiny_cifar(directory, n_train=24, n_test=16):
  """A miniature CIFAR-10 in the python-pickle layout (random pixels)."""
  import pickle  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  for name in names:
    n = n_test if name == "test_batch" else n_train
    with open(directory / name, "wb") as f:
      pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   b"labels": rng.integers(0, 10, n).tolist()}, f)


def test_cifar10_resnet20_path_runs_on_a_tiny_fixture(tmp_path):
  data_dir = tmp_path / "cifar"
  data_dir.mkdir()
  _write_tiny_cifar(data_dir)
  out = tmp_path / "out"
  code = demo.main(["--dataset", "cifar10", "--data-dir", str(data_dir), "--bits", "2",
                    "--seeds", "1", "--epochs", "1", "--fp-epochs", "1",
                    "--batch-size", "40", "--out", str(out)])
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  assert results["config"]["model"] == "resnet20"
  assert {r["method"] for r in results["runs"]} == {"sgd", "talr"}
  # 120 training images / batch 40 = 3 steps per epoch.
  assert all(len(r["trace"]["k"]) == 3 for r in results["runs"])
