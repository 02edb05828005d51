"""The shipped examples run end to end."""

import math
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _shape(line: str) -> str:
  """A printed line with every number replaced by ``#``: what must not change
  between machines, while the digits may."""
  return re.sub(r"-?\d+(\.\d+)?(e[-+]\d+)?", "#", line.rstrip())


def _quoted_output(doc: str, marker: str) -> list[str]:
  """The lines of the code block of ``doc`` (under the repo root) containing ``marker``."""
  blocks, block = [], None
  for line in (ROOT / doc).read_text().splitlines():
    if line.startswith("```") and block is None:  # opens a block
      block = []
    elif line.startswith("```"):  # closes it
      blocks.append(block)
      block = None
    elif block is not None:
      block.append(line)
  (quoted,) = [b for b in blocks if any(marker in line for line in b)]
  return quoted


def _assert_doc_quotes(doc: str, marker: str, out: str, whole: bool) -> None:
  """``doc`` quotes lines the example prints, up to the digits (and, if
  ``whole``, all of them, in order)."""
  quoted = [_shape(l) for l in _quoted_output(doc, marker)]
  printed = [_shape(l) for l in out.splitlines() if l.strip()]
  if whole:
    assert quoted == printed, (doc, quoted, printed)
  else:
    assert set(quoted) <= set(printed), (doc, set(quoted) - set(printed))


def test_quickstart_runs_and_reports(capsys, monkeypatch):
  pytest.importorskip("sklearn")
  monkeypatch.setattr(sys, "argv", ["quickstart.py"])
  runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
  out = capsys.readouterr().out
  assert "test accuracy" in out
  # Both runs learn the task well above chance (10 classes).
  line = next(l for l in out.splitlines() if "test accuracy" in l)
  accs = [float(line.split("SGD:")[1].split()[0]), float(line.split("SGDT:")[1].split()[0])]
  assert min(accs) > 0.8
  # Both transition rates are measured (the baseline by the monitor); once the
  # EMA has caught up, SGDT's K is nearer its target than plain SGD's.
  rows = [l.split() for l in out.splitlines() if l.strip().startswith("step ")]
  assert [int(r[1]) for r in rows] == [150, 300, 450]
  for row in rows[1:]:
    target, k_sgd, k_sgdt = float(row[3]), float(row[6]), float(row[9])
    assert min(k_sgd, k_sgdt) > 0
    assert abs(math.log(k_sgdt / target)) < abs(math.log(k_sgd / target))
  # U rises from U_0 = 0.05 while K is below R (docs/method.md reads this).
  u = [float(r[11]) for r in rows]
  assert 0.05 < u[0] < u[1]
  _assert_doc_quotes("docs/method.md", "SGDT K", out, whole=False)


def test_qwix_example_runs_and_reports(capsys, monkeypatch):
  pytest.importorskip("qwix")
  pytest.importorskip("sklearn")
  monkeypatch.setattr(sys, "argv", ["qwix_qat.py"])
  runpy.run_path(str(EXAMPLES / "qwix_qat.py"), run_name="__main__")
  out = capsys.readouterr().out
  assert "QAT steps" in out and "accuracy" in out.lower()
  _assert_doc_quotes("docs/qwix.md", "QAT steps", out, whole=True)
  # SGDT's K is within a factor 2 of R while R is not small (steps 200, 400),
  # and plain SGD changes fewer levels than SGDT there.
  sgdt = out.split("SGDT test accuracy")[1]
  for layer in ("fc2", "fc3"):
    k = [float(v) for v in re.search(rf"{layer} K(.*)", sgdt).group(1).split()]
    r = [float(v) for v in re.search(rf"{layer} R(.*)", sgdt).group(1).split()]
    k_sgd = [float(v) for v in re.search(rf"{layer} K(.*)", out).group(1).split()]
    for i in (0, 1):
      assert 0.5 < k[i] / r[i] < 2, (layer, k, r)
      assert k_sgd[i] < k[i]
