"""The shipped examples run end to end."""

import math
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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


def test_qwix_example_runs_and_reports(capsys, monkeypatch):
  pytest.importorskip("qwix")
  pytest.importorskip("sklearn")
  monkeypatch.setattr(sys, "argv", ["qwix_qat.py"])
  runpy.run_path(str(EXAMPLES / "qwix_qat.py"), run_name="__main__")
  out = capsys.readouterr().out
  assert "QAT steps" in out and "accuracy" in out.lower()
