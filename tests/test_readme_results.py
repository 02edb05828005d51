"""benchmarks/readme_results.py: the README's generated tables equal what the committed
results files render to, and the writer replaces exactly its block."""

import json
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
