"""Quotes of long commands, compared with what they print (opt-in: ``python -m
pytest -m slow tests/test_docs_slow.py``; a few minutes on 2 CPU cores)."""

import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from _doc_quotes import assert_doc_quotes  # noqa: E402  pylint: disable=g-import-not-at-top
from talr_optax import demo  # noqa: E402  pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("argv, marker", [
    (["--quick"], "58,490 bytes"),
    (["--task", "lm", "--quick"], "544,316 bytes"),
])
def test_serving_quotes_the_export_lines_of_the_quick_demos(argv, marker, tmp_path, capsys):
  """docs/serving.md's export lines: the same words and byte counts, the scores
  within 0.01 of accuracy or 0.05 bits per byte."""
  assert demo.main(argv + ["--out", str(tmp_path)]) == 0
  printed = capsys.readouterr().out
  exports = [line for line in printed.splitlines() if line.startswith("export ")]
  assert_doc_quotes("docs/serving.md", marker, "\n".join(exports))
