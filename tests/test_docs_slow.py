"""Quotes of long commands, compared with what they print (opt-in: ``python -m
pytest -m slow tests/test_docs_slow.py``; a few minutes on 2 CPU cores)."""

import os
import re
import subprocess
import sys
from pathlib import Path

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


def _qwix_scale_transitions(*args: str) -> dict[str, tuple[list[float], list[float]]]:
  """``benchmarks/qwix_scale_transitions.py`` run as documented: per rules, the
  mean level changes per weight per step and the scale-only share of each seed."""
  pytest.importorskip("qwix")
  root = Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "benchmarks/qwix_scale_transitions.py", *args],
                       cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                       capture_output=True, text=True, check=True).stdout
  rows: dict[str, tuple[list[float], list[float]]] = {"absmax": ([], []), "frozen": ([], [])}
  for m in re.finditer(r"^ +\d+  (absmax|frozen) +\d+ +(\S+) +\d+ +(\S+)%$", out, re.M):
    rows[m.group(1)][0].append(float(m.group(2)))
    rows[m.group(1)][1].append(float(m.group(3)))
  return rows


@pytest.mark.parametrize("args, setup", [
    ((), "`fc2`, `fc3` in int2; lr 0.05"),
    (("--lr", "0.1", "--momentum", "0", "--quantize", "fc2"), "`fc2` in int2; lr 0.1"),
])
def test_qwix_quotes_the_scale_transitions_benchmark(args, setup):
  """docs/qwix.md's table: each range within a factor 1.5 of the printed one
  (the shares within 3 points), and no scale-only change with frozen rules."""
  lines = (Path(__file__).resolve().parents[1] / "docs" / "qwix.md").read_text().splitlines()
  i = next(i for i, line in enumerate(lines) if line.startswith(f"| {setup}"))
  printed = _qwix_scale_transitions(*args)
  for line, rules in zip(lines[i:i + 2], ("absmax", "frozen")):
    rate, share = [c.strip() for c in line.strip().strip("|").split("|")][2:4]
    rates, shares = printed[rules]
    assert len(rates) == 3, printed
    low, high = (float(x) for x in rate.split(" to "))
    assert 1 / 1.5 < low / min(rates) < 1.5 and 1 / 1.5 < high / max(rates) < 1.5, (
        line, rates)
    if rules == "frozen":
      assert share == "**0 %**" and max(shares) == 0.0, (line, shares)
    else:
      low, high = (float(x) for x in re.findall(r"[\d.]+", share))
      assert abs(low - min(shares)) <= 3 and abs(high - max(shares)) <= 3, (line, shares)
