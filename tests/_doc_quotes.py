"""Docs that quote what a command prints, compared with what it prints now.

A quote must have the printed lines' words, and numbers close to the printed
ones. The digits depend on the CPU's matrix kernels (docs/reproducibility.md),
so exact equality would hold on the machine that made the quote only.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]\d+)?"
# How far a quoted number may be from the printed one. On one machine, starting
# weights changed in their last bit moved the quickstart's U at step 450 between
# 109 and 149 and its final U between 1.15 and 1.66. A quote from an older
# version is further off (the quickstart's from before ema_momentum_for: U 0.143
# against 3.72 at step 150).
_RATIO = 2.0         # any number: within a factor 2, same sign
_ACCURACY = 0.01     # a test accuracy (the line says "accuracy"): within 0.01, 3-4 test images
_BITS_PER_BYTE = 0.05  # bits per byte (the line says so): within 0.05


def shape(line: str) -> str:
  """A printed line with every number replaced by ``#``: what must not change
  between machines, while the digits may."""
  return re.sub(_NUMBER, "#", line.rstrip())


def numbers(line: str) -> list[float]:
  """The numbers of ``line``, thousands commas allowed."""
  return [float(m.group().replace(",", "")) for m in re.finditer(_NUMBER, line)]


def _close(quoted: float, printed: float, line: str) -> bool:
  if "accuracy" in line:
    return abs(quoted - printed) <= _ACCURACY + 1e-9
  if "bits per byte" in line:
    return abs(quoted - printed) <= _BITS_PER_BYTE + 1e-9
  if quoted == printed:
    return True
  if quoted * printed <= 0:
    return False
  return max(quoted / printed, printed / quoted) <= _RATIO


def quoted_output(doc: str, marker: str) -> list[str]:
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


def assert_doc_quotes(doc: str, marker: str, out: str) -> None:
  """The code block of ``doc`` containing ``marker`` is what the command printed
  (``out``): all its non-empty lines, in order, with the same words, and every
  number within ``_RATIO`` of the printed one (a test accuracy within
  ``_ACCURACY``, bits per byte within ``_BITS_PER_BYTE``)."""
  quoted = [l.rstrip() for l in quoted_output(doc, marker)]
  printed = [l.rstrip() for l in out.splitlines() if l.strip()]
  assert [shape(l) for l in quoted] == [shape(l) for l in printed], (
      f"{doc} quotes other lines than the command prints:\n" + "\n".join(printed))
  stale = [(q, p) for q, p in zip(quoted, printed)
           if not all(_close(a, b, p) for a, b in zip(numbers(q), numbers(p)))]
  assert not stale, (
      f"{doc} quotes numbers the command no longer prints (quoted, then printed):\n"
      + "\n".join(f"  {q}\n  {p}" for q, p in stale)
      + "\nThe command printed:\n" + "\n".join(printed))


def quoted_line(doc: str, marker: str, prefix: str) -> str:
  """The line starting with ``prefix`` in the code block of ``doc`` containing ``marker``."""
  (line,) = [l for l in quoted_output(doc, marker) if l.startswith(prefix)]
  return line
