"""Smoke test of benchmarks/: every script runs in its smallest mode, and the numbers
that do not depend on the machine are checked exactly.

Never asserts a time: the machines that run this are shared and noisy.
Asserted: TALR's extra optimizer state is 1 byte (the int8 level) per counted
weight plus 5 float32 rates per rate group and one int32 step count (exact
counting: every quantized weight; ``sample_size=65536``: at most 65,536 per
rate group), also for a 7B-parameter Llama tree sized without allocating it;
and jitted steps recompile 0 times after the first step while the rates change;
the sampling-fidelity study reports which tensors it sampled, and with exact
counting TALR's K equals its exact monitor's.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness as H  # noqa: E402  pylint: disable=wrong-import-position

RATE_BYTES = 6 * 4  # k, K, R, R_0, U, c: float32 each
COUNT_BYTES = 4


def _load(path):
  with open(path) as f:
    return json.load(f)


def _check_talr_bytes(r, sampled):
  groups = r["rate_groups"]
  assert r["rate_vector_bytes"] == RATE_BYTES * groups, r
  assert r["other_extra_bytes"] == 0, r
  if sampled:
    assert r["prev_levels_bytes"] <= H.SAMPLE_SIZE * groups, r
  else:
    assert r["prev_levels_bytes"] == r["n_quantized"], r  # int8: 1 byte per weight
  assert r["extra_bytes"] == r["prev_levels_bytes"] + RATE_BYTES * groups + r["count_bytes"], r


def test_state_bytes_exact(tmp_path):
  import state_bytes  # pylint: disable=import-outside-toplevel
  out = tmp_path / "state_bytes.json"
  rows = state_bytes.main(["--settings", "conv,llama7b", "--sizes", "0.1M,1M",
                           "--out", str(out)])
  assert _load(out)["rows"] == rows
  conv = [r for r in rows if r["setting"].startswith("conv")]
  assert {(r["baseline"], r["variant"]) for r in conv} == set(state_bytes.CONV_PAIRS)
  for r in conv:
    n_tensors = len(H.SIZES[r["setting"].split()[1]])
    assert r["n_quantized"] == r["n_params"] and r["rate_groups"] == n_tensors
    assert r["count_bytes"] == COUNT_BYTES
    _check_talr_bytes(r, sampled=r["variant"].endswith("sampled"))
  # 0.1M tensors (10,368 weights) are below the sample size: counted exactly.
  small = {r["variant"]: r for r in conv if r["setting"] == "conv 0.1M"}
  assert small["sgdt_sampled"]["prev_levels_bytes"] == small["sgdt"]["n_quantized"]

  llama = [r for r in rows if r["setting"].startswith("llama7b")]
  assert len(llama) == 12  # {f32, bf16} x {unstacked, stacked} x {adam, adamt, sampled}
  for r in llama:
    assert r["n_params"] == 6_738_415_616 and r["n_quantized"] == 6_476_005_376
    if r["variant"] == "adam":
      assert r["extra_bytes"] == 0
      assert r["state_bytes"] == 2 * r["n_params"] * (4 if r["dtype"] == "float32" else 2) + 4
      continue
    assert r["rate_groups"] == 224 and r["count_bytes"] == COUNT_BYTES
    _check_talr_bytes(r, sampled=r["variant"] == "adamt_sampled")
  exact = [r for r in llama if r["variant"] == "adamt"]
  assert all(abs(r["extra_bytes_per_quantized_weight"] - 1.0) < 1e-5 for r in exact)
  # Sized without allocating: 7B float32 params alone would be 27 GB.
  rss = _load(out)["meta"]["peak_rss"]
  assert rss["after_llama_mb"] - rss["start_mb"] < 500, rss


def test_recompiles_zero(tmp_path):
  import recompiles  # pylint: disable=import-outside-toplevel
  out = tmp_path / "recompiles.json"
  scenarios = list(recompiles.SCENARIOS)
  if importlib.util.find_spec("flax") is None:
    scenarios.remove("nnx")
  rows = recompiles.main(["--quick", "--steps", "8", "--out", str(out),
                          "--scenarios", ",".join(scenarios)])
  assert [r["scenario"] for r in rows] == scenarios
  for r in rows:
    assert r["recompiles_after_first_step"] == 0, r
    assert r["retraces_after_first_step"] == 0, r
    assert r["steps_with_changed_rates"] == r["steps"] - 1, r  # the rates did move
  by_name = {r["scenario"]: r for r in rows}
  assert by_name["layer_axes"]["n_rate_values"] == by_name["sgdt"]["n_rate_values"]


def test_optimizer_step_and_scaling_run(tmp_path):
  import optimizer_step  # pylint: disable=import-outside-toplevel
  import scaling  # pylint: disable=import-outside-toplevel
  out = tmp_path / "optimizer_step.json"
  rows = optimizer_step.main(["--sizes", "0.1M", "--repeats", "2", "--warmup", "0",
                              "--variants", "sgdt,sgdt_sampled,adamt", "--sample-size", "2048",
                              "--out", str(out)])
  assert {r["variant"] for r in rows} == {"sgd", "sgdt", "sgdt_sampled", "adam", "adamt"}
  by_v = {r["variant"]: r for r in rows}
  for r in rows:
    assert r["repeats"] == 2 and r["median_ms"] > 0
    assert not r["hlo_update_waits_for_count"], r  # the update never waits for the count
  assert by_v["sgdt"]["hlo_bytes_per_weight"] > by_v["sgdt_sampled"]["hlo_bytes_per_weight"]
  res = scaling.main(["--input", str(out), "--out", str(tmp_path / "scaling.json")])
  assert {r["variant"] for r in res} == {"sgd", "sgdt", "sgdt_sampled", "adam", "adamt"}


def test_remedies_step_runs_and_state_bytes(tmp_path):
  import remedies_step  # pylint: disable=import-outside-toplevel
  rows = remedies_step.main(["--sizes", "0.1M", "--repeats", "2", "--warmup", "0",
                             "--out", str(tmp_path / "remedies_step.json")])
  by_v = {r["variant"]: r for r in rows}
  assert set(by_v) == set(remedies_step.VARIANTS)
  n = by_v["adamw"]["n_weights"]
  # AdamW: two float32 moments and a count. Dampening: one more int32 count.
  # Freezing: 11 bytes per quantized weight plus a count and one frozen
  # fraction per tensor (ten tensors). TALR: the int8 level and its rates.
  adamw = 8 + 4 / n
  assert by_v["adamw"]["state_bytes_per_weight"] == pytest.approx(adamw)
  assert by_v["adamw_dampen"]["state_bytes_per_weight"] == pytest.approx(adamw + 4 / n)
  freeze = 11 + (4 + 10 * 4) / n
  assert by_v["adamw_freeze"]["state_bytes_per_weight"] == pytest.approx(adamw + freeze)
  assert by_v["adamwt_freeze"]["state_bytes_per_weight"] == pytest.approx(
      by_v["adamwt"]["state_bytes_per_weight"] + freeze)


def test_train_step_runs(tmp_path):
  pytest.importorskip("flax")
  import train_step  # pylint: disable=import-outside-toplevel
  out = tmp_path / "train_step.json"
  # The @nnx.jit style runs in test_recompiles_zero (scenario "nnx"); one style here
  # keeps the module short (every style and variant is one more compilation).
  rows = train_step.main(["--models", "cnn", "--batch", "4", "--repeats", "2", "--warmup", "0",
                          "--variants", "sgdt", "--styles", "functional", "--out", str(out)])
  assert [(r["style"], r["variant"]) for r in rows] == [("functional", "sgd"), ("functional", "sgdt")]
  assert _load(out)["meta"]["recompiles_while_timing"] == 0
  sgd, sgdt = rows[:2]
  groups = sgdt["n_quantized_tensors"]
  assert sgdt["opt_state_bytes"] - sgd["opt_state_bytes"] == (
      sgdt["n_quantized"] + RATE_BYTES * groups + COUNT_BYTES)
  assert sgdt["optimizer_graph_nodes"] > sgd["optimizer_graph_nodes"]


def test_sampling_fidelity_quick(tmp_path):
  pytest.importorskip("flax")
  pytest.importorskip("sklearn")
  import sampling_fidelity  # pylint: disable=import-outside-toplevel
  out = tmp_path / "fidelity.json"
  result = sampling_fidelity.main(["--quick", "--out", str(out)])
  assert _load(out)["summary"] == json.loads(json.dumps(result["summary"]))
  (row,) = result["summary"]
  # SmallCNN's two quantized tensors (4,608 and 9,216 weights) are both sampled at N = 256.
  assert row["sample_size"] == 256
  assert [t.split(" ")[0] for t in row["sampled_tensors"]] == ["conv2/kernel", "conv3/kernel"]
  assert len(row["mean_abs_error_per_seed"]) == len(row["accuracy_sampled"]) == 1
  assert len(row["accuracy_exact"]) == 1
  assert row["expected_se_at_r0"] > 0 and row["expected_mean_abs_error"] > 0
  exact, sampled = sorted(result["rows"], key=lambda r: r["sample_size"] is not None)
  # Exact counting: the monitor and TALR count the same levels.
  assert exact["mean_abs_error_all_groups"] < 1e-6 and exact["sampled_groups"] == []
  # Sampled: TALR's K was counted on at most 256 weights per tensor, and differs.
  assert all(0 < g["counted"] <= 256 < g["weights"] for g in sampled["groups"])
  assert sampled["mean_abs_error"] > 0
  assert 0 <= sampled["final_accuracy"] <= 1 and sampled["steps"] == 2 * 44
