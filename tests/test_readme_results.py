"""benchmarks/readme_results.py: the README's generated tables equal what the committed
results files render to, and the writer replaces exactly its block."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_results  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize("page", ["README.md", "docs/study.md"])
def test_generated_tables_match_the_committed_results(page):
  assert readme_results.main(["--readme", str(ROOT / page), "--check"]) == 0


def test_every_number_of_the_study_block_comes_from_its_file():
  text = (ROOT / "README.md").read_text()
  source = readme_results.sources_in(text)["qat_study"]
  results = json.loads((ROOT / source).read_text())
  block = readme_results._pattern("qat_study").search(text).group(2)
  for row in results["summary"]:
    assert f"{row['mean']:.4f} ± {row['std']:.4f}" in block
    if row["paired_diff_ci95"] is not None:
      low, high = row["paired_diff_ci95"]
      assert f"[{low:+.4f}, {high:+.4f}]" in block


def test_update_replaces_only_its_block_and_check_fails_when_stale(tmp_path):
  text = "intro\n<!-- results:qat_study begin -->\nold\n<!-- results:qat_study end -->\nrest\n"
  assert readme_results.update(text, "qat_study", "new") == (
      "intro\n<!-- results:qat_study begin -->\nnew\n<!-- results:qat_study end -->\nrest\n")
  readme = tmp_path / "README.md"
  source = "benchmarks/results/qat_study/quick.json"
  readme.write_text(text.replace("old", f"From `{source}` stale"))
  assert readme_results.main(["--readme", str(readme), "--check"]) == 1
  assert readme_results.main(["--readme", str(readme)]) == 0
  assert readme_results.main(["--readme", str(readme), "--check"]) == 0
  assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("rest\n")


@pytest.mark.parametrize("text", ["no block", "<!-- results:qat_study begin -->\n"])
def test_update_refuses_a_readme_without_the_block(text):
  with pytest.raises(ValueError, match="results:qat_study"):
    readme_results.update(text, "qat_study", "table")


def _results_section(text: str) -> str:
  return text[text.index("## Results"):text.index("\n## ", text.index("## Results") + 1)]


def test_the_results_section_has_no_number_outside_a_generated_block():
  section = _results_section((ROOT / "README.md").read_text())
  prose = re.sub(r"<!-- results:(\w+) begin -->.*?<!-- results:\1 end -->", "", section, flags=re.S)
  prose = re.sub(r"`[^`]*`", "", prose)  # code: commands, argument names
  prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets
  assert re.findall(r"\S*\d\S*", prose) == []


@pytest.mark.parametrize("name", ["train_step", "optimizer_step", "state_bytes"])
def test_the_cost_blocks_render_their_committed_files(name):
  text = (ROOT / "README.md").read_text()
  source = readme_results.sources_in(text)[name]
  assert source == readme_results.TABLES[name][0]
  results = json.loads((ROOT / source).read_text())
  block = readme_results._pattern(name).search(text).group(2)
  if name == "train_step":
    sgdt = [r for r in results["rows"] if r["variant"] == "sgdt"]
    assert all(f"{r['ratio']:.3f}x" in block for r in sgdt)
  elif name == "optimizer_step":
    exact = [r["ratio"] for r in results["rows"] if r["variant"] in ("sgdt", "adamt")]
    assert f"{min(exact):.2f}-{max(exact):.2f}x with exact counting" in block
  else:
    adamt = next(r for r in results["rows"]
                 if r["setting"] == "llama7b unstacked float32" and r["variant"] == "adamt")
    assert f"| {adamt['state_bytes'] / 1e9:.2f} GB | {adamt['state_bytes_per_weight']:.3f} |" in block


def _study_row(arm, bits, diff, low, high, conclusion):
  return {"task": "lm", "bits": bits, "arm": arm, "label": arm, "seeds": [1, 2, 3],
          "mean": 2.0 + diff, "std": 0.01, "paired_diff_vs_best_baseline": diff,
          "paired_diff_ci95": [low, high], "best_baseline": "adamw", "conclusion": conclusion,
          "better_on_seeds": 1, "tracking_error": 0.1, "late_oscillation": 1e-3,
          "frozen_fraction": None, "tuned_value": 1e-3, "knob": "k"}


def test_the_study_block_names_talrs_losses_first_and_counts_each_verdict():
  rows = [_study_row("adamw", 2, -0.01, -0.02, -0.001, "better"),
          _study_row("adamwt", 2, -0.03, -0.05, -0.01, "better"),
          _study_row("adamwt", 3, +0.02, +0.01, +0.03, "worse"),
          _study_row("adamwt_freezing", 3, 0.0, -0.01, +0.01, "no detectable difference")]
  results = {"config": {"fp_steps": 10, "steps": 20}, "arms": [{"values": [1, 2, 3]}],
             "model": {"width": 8, "layers": 1, "parameters": 100, "quantized_parameters": 50},
             "machine": {"cpu_count": 2, "cpu_model": "cpu"}, "summary": rows, "seconds": 60.0}
  text = readme_results.render_qat_study(results, "r.json")
  assert ("worse in 1, no detectable difference in 1, better in 1 of 3 comparisons" in text)
  bullets = [line for line in text.splitlines() if line.startswith("- ")]
  assert [b.split(":")[0] + ":" + b.split(":")[1].split()[0] for b in bullets] == [
      "- W3:adamwt", "- W3:adamwt_freezing", "- W2:adamwt"]
  assert "loses to" in bullets[0] and "wins against" in bullets[2]
