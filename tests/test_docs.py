"""Code and numbers in the docs that no example run checks: the code runs as
written, and numbers said to come from a committed results file are in it."""

import json
import re
from pathlib import Path

import jax
import numpy as np
import jax.numpy as jnp
import optax
import pytest

import talr_optax as talr

ROOT = Path(__file__).resolve().parents[1]


def _code_block(doc: str, marker: str) -> str:
  """The one fenced code block of ``doc`` that contains ``marker``."""
  blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (ROOT / doc).read_text(), flags=re.S | re.M)
  (block,) = [b for b in blocks if marker in b]
  return block


def test_method_cap_on_u_runs_as_written_and_bounds_u():
  """docs/method.md's ``max_talr`` snippet: U stops at the cap, c follows it,
  and the same steps without the cap take U far above it."""
  params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "b": jnp.zeros(8)}
  levels_fn = talr.levels_fn_from_scales({"w": 1.0, "b": None}, bits=2)
  target = talr.cosine_target(talr.initial_target(2), 200)
  namespace = {"target": target, "levels_fn": levels_fn}
  exec(compile(_code_block("docs/method.md", "max_talr=0.5"), "docs/method.md", "exec"),
       namespace)  # pylint: disable=exec-used
  capped = namespace["tx"]
  plain = optax.chain(optax.trace(0.9), talr.scale_by_talr(
      target, levels_fn, learning_rate=0.05, fallback_learning_rate=0.05))
  # A tiny gradient moves no weight across a point: K falls and U rises.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-6), params)

  def run(tx):
    p, state = params, tx.init(params)
    for _ in range(60):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return state[1]

  assert float(run(plain).talr[0]) > 5.0
  state = run(capped)
  assert float(state.talr[0]) == pytest.approx(0.5)
  assert float(state.talr_scale[0]) == pytest.approx(0.5 / 0.05)
  assert float(talr.metrics(state)["talr/w"]) == pytest.approx(0.5)


# ---------------------------------------------------------------------------
# Tables copied by hand from committed results files: every number is the
# file's, rounded as printed. A rerun that rewrites a file without the page
# fails here (the page must then be rewritten from the new file).


def _results(name: str) -> dict:
  return json.loads((ROOT / "benchmarks" / "results" / name).read_text())


def _table(doc: str, header: str) -> list[list[str]]:
  """The body rows (cells stripped) of the Markdown table of ``doc`` whose header
  row starts with ``header``."""
  lines = (ROOT / doc).read_text().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip().strip("|").split("|")])
  return rows


def _nums(text: str) -> list[str]:
  """The numbers in ``text`` as printed (thousands commas and a Unicode minus allowed)."""
  # A sign only where no digit precedes it: "[2.02-2.39]" is two positive numbers.
  return re.findall(r"(?<![\d.])[-+]?\d[\d,]*(?:\.\d+)?", text.replace("\u2212", "-"))


def _rounds_to(printed: str, value: float) -> bool:
  """``value`` printed with as many decimals as ``printed`` has gives ``printed``."""
  decimals = len(printed.split(".")[1]) if "." in printed else 0
  return abs(float(printed.replace(",", "")) - value) <= 0.5 * 10 ** -decimals + 1e-12


def _assert_row(doc: str, row: list[str], cells: slice, expected: list[float]) -> None:
  printed = [n for cell in row[cells] for n in _nums(cell)]
  assert len(printed) == len(expected), (doc, row, expected)
  wrong = [(p, e) for p, e in zip(printed, expected) if not _rounds_to(p, e)]
  assert not wrong, f"{doc}: row {row} differs from its results file (printed, file): {wrong}"


def _ratio_cells(r: dict) -> list[float]:
  return [r["ratio"], r["ratio_q1"], r["ratio_q3"]]


def test_performance_train_step_table_is_the_committed_file():
  rows = {(r["model"], r["style"], r["variant"]): r for r in _results("train_step.json")["rows"]}
  table = _table("docs/performance.md", "| model, batch | style |")
  assert len(table) == 4
  for row in table:
    model = "cnn" if row[0].startswith("SmallCNN") else "resnet20"
    style = "nnx" if "nnx.jit" in row[1] else "functional"
    sgdt, track = rows[(model, style, "sgdt")], rows[(model, style, "sgd_track")]
    expected = [rows[(model, style, "sgd")]["median_ms"]] + _ratio_cells(sgdt)
    # The tracking column gives the ratio alone where its quartiles round to it.
    expected += [track["ratio"]] if "[" not in row[4] else _ratio_cells(track)
    _assert_row("docs/performance.md", row, slice(2, 5), expected)
    assert rows[(model, style, "sgd")]["batch"] == int(row[0].split(",")[1])


def test_performance_optimizer_step_table_is_the_committed_file():
  rows = {(r["size"], r["variant"]): r for r in _results("optimizer_step.json")["rows"]}
  table = _table("docs/performance.md", "| weights | SGD ms |")
  assert [row[0] for row in table] == ["1.0M", "10.3M", "51.6M"]
  for row, size in zip(table, ("1M", "10M", "50M")):
    r = lambda v: rows[(size, v)]
    assert _rounds_to(row[0][:-1], r("sgd")["n_weights"] / 1e6)
    expected = ([r("sgd")["median_ms"]] + _ratio_cells(r("sgdt")) + _ratio_cells(r("sgdt_sampled"))
                + [r("adam")["median_ms"]] + _ratio_cells(r("adamt"))
                + _ratio_cells(r("adamt_sampled")))
    _assert_row("docs/performance.md", row, slice(1, 7), expected)
  # "the waits column is no for every variant"
  assert not any(r["hlo_update_waits_for_count"] for r in rows.values())


def test_performance_scaling_state_bytes_and_recompiles_are_the_committed_files():
  text = (ROOT / "docs" / "performance.md").read_text()
  slopes = {r["variant"]: r["per_weight_ratio"] for r in _results("scaling.json")["rows"]}
  m = re.search(r"sampled SGDT is ([\d.]+) times plain SGD's, of\s+sampled AdamT ([\d.]+); "
                r"exact SGDT ([\d.]+) and AdamT (\d+\.\d+)", text)
  for printed, variant in zip(m.groups(), ("sgdt_sampled", "adamt_sampled", "sgdt", "adamt")):
    assert _rounds_to(printed, slopes[variant]), (variant, printed, slopes[variant])

  rows = {r["variant"]: r for r in _results("state_bytes.json")["rows"]
          if r["setting"] == "llama7b unstacked float32"}
  table = _table("docs/performance.md", "| optimizer | state |")
  for row, variant in zip(table, ("adam", "adamt", "adamt_sampled"), strict=True):
    r = rows[variant]
    expected = [r["state_bytes"] / 1e9, r["state_bytes_per_weight"]]
    if variant == "adamt":
      expected += [r["extra_bytes"] / 1e9, r["extra_bytes_per_quantized_weight"]]
    elif variant == "adamt_sampled":
      expected += [r["extra_bytes"] / 1e6, r["extra_bytes_per_quantized_weight"]]
    # The sampled row's setting names sample_size=65536.
    _assert_row("docs/performance.md", row, slice(1, 5), expected)

  recompiles = _results("recompiles.json")["rows"]
  assert "0 recompilations and 0 retraces after the first step over 50 steps" in text
  assert all(r["recompiles_after_first_step"] == r["retraces_after_first_step"] == 0
             and r["steps"] == 50 for r in recompiles)


@pytest.mark.parametrize("name, header", [
    ("sampling_fidelity_digits_cnn.json", "SmallCNN (both quantized tensors"),
    ("sampling_fidelity_digits_mobilenet.json", "MobileNetV2Tiny (12 quantized tensors"),
    ("sampling_fidelity_lm.json", "**Language model**"),
])
def test_benchmarks_readme_sampling_tables_are_the_committed_files(name, header):
  """benchmarks/README.md's sampling-fidelity tables: every number is the file's."""
  summary = _results(name)["summary"]
  lines = (ROOT / "benchmarks" / "README.md").read_text().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  table_start = next(i for i in range(start, len(lines)) if lines[i].startswith("| N |"))
  rows = []
  for line in lines[table_start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip().strip("|").split("|")])
  assert len(rows) == len(summary)
  for row, s in zip(rows, summary):
    expected = [s["sample_size"]]
    if "counted_weights" in s:  # the LM table: groups sampled (words), then "3,072 of 98,304"
      row = [row[0]] + row[2:]
      expected += [s["counted_weights"], s["weights"]]
    expected += list(s["mean_abs_error_per_seed"]) + [
        s["mean_abs_error"], s["mean_signed_error"], s["expected_se_at_r0"],
        s["expected_mean_abs_error"]] + [s["replayed_on_exact_runs"][k] for k in
                                         ("grid", "fixed_random", "fresh_random")]
    for key in ("accuracy_sampled", "accuracy_exact", "bits_per_byte_sampled",
                "bits_per_byte_exact"):
      if key in s:  # mean ± standard deviation over the seeds
        expected += [float(np.mean(s[key])), float(np.std(s[key]))]
    _assert_row("benchmarks/README.md", row, slice(0, None), expected)
