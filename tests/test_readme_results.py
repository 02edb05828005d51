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


@pytest.mark.parametrize("task", ["lm", "conv"])
def test_every_verdict_of_the_study_blocks_comes_from_its_file(task):
  text = (ROOT / "README.md").read_text()
  name = f"study_{task}"
  source = readme_results.sources_in(text)[name]
  results = json.loads((ROOT / source).read_text())
  block = readme_results._pattern(name).search(text).group(2)
  fmt = ".2f" if task == "conv" else ".4f"
  for v in results["summary"]["verdicts"]:
    low, high = v["ci95"]
    assert f"[{low:+{fmt}}, {high:+{fmt}}]" in block
  table = (ROOT / "docs" / "study.md").read_text()
  for row in results["summary"]["rows"]:
    assert f"{row['mean']:{fmt}} ± {row['std']:{fmt}}" in table


def test_update_replaces_only_its_block_and_check_fails_when_stale(tmp_path):
  text = "intro\n<!-- results:study_lm begin -->\nold\n<!-- results:study_lm end -->\nrest\n"
  assert readme_results.update(text, "study_lm", "new") == (
      "intro\n<!-- results:study_lm begin -->\nnew\n<!-- results:study_lm end -->\nrest\n")
  readme = tmp_path / "README.md"
  source = "benchmarks/results/qat_study/lm.json"
  readme.write_text(text.replace("old", f"From `{source}` stale"))
  assert readme_results.main(["--readme", str(readme), "--check"]) == 1
  assert readme_results.main(["--readme", str(readme)]) == 0
  assert readme_results.main(["--readme", str(readme), "--check"]) == 0
  assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("rest\n")


@pytest.mark.parametrize("text", ["no block", "<!-- results:study_lm begin -->\n"])
def test_update_refuses_a_readme_without_the_block(text):
  with pytest.raises(ValueError, match="results:study_lm"):
    readme_results.update(text, "study_lm", "table")


@pytest.mark.parametrize("check", [True, False])
def test_a_page_without_generated_blocks_is_an_error_not_a_match(tmp_path, check, capsys):
  page = tmp_path / "page.md"
  page.write_text("# A page\n\nNo generated block here.\n")
  argv = ["--readme", str(page)] + (["--check"] if check else [])
  assert readme_results.main(argv) == 1
  assert "holds no generated block" in capsys.readouterr().out


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


def _verdict(arm, bits, mean, low, high, conclusion, comparison="best TALR arm vs best remedy"):
  return {"arm": arm, "reference": "adamw_freezing", "bits": bits, "mean": mean,
          "ci95": [low, high], "conclusion": conclusion, "lower_on": 1, "n": 3,
          "comparison": comparison}


def test_the_study_block_names_talrs_losses_first_and_counts_each_verdict():
  labels = {"adamwt": "AdamWT", "adamwt_freezing": "AdamWT + freezing",
            "adamw_freezing": "AdamW + freezing"}
  rows = [{"arm": a, "label": l} for a, l in labels.items()]
  verdicts = [_verdict("adamwt", 2, -0.03, -0.05, -0.01, "better"),
              _verdict("adamwt", 3, +0.02, +0.01, +0.03, "worse"),
              _verdict("adamwt_freezing", 3, 0.0, -0.01, +0.01, "no detectable difference")]
  results = {"task": {"name": "lm", "model": {"width": 8, "layers": 1, "parameters": 100,
                                             "quantized_parameters": 50}},
             "config": {"seeds": 3, "quick": False, "lm": {"fp_steps": 10, "steps": 20}},
             "settings": {"max_tuning_runs": 6},
             "machine": {"cpu_count": 2, "cpu_model": "cpu"}, "seconds": 60.0,
             "summary": {"rows": rows, "verdicts": verdicts,
                         "at_grid_edge": [{"bits": 2, "arm": "adamwt", "chosen": 0.01}]}}
  text = readme_results.render_study_verdicts(results, "r.json")
  assert "worse in 1, no detectable difference in 1, better in 1 of 3" in text
  bullets = [line for line in text.splitlines() if line.startswith("- ")]
  assert [b.split(",")[0] for b in bullets] == ["- W3", "- W3", "- W2"]
  assert "loses to" in bullets[0] and "wins against" in bullets[2]
  assert "Caveat, first: W2 AdamWT's chosen value 0.01 is at an end of its grid" in text
