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
