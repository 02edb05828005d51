"""Writes the README's result tables from committed ``results.json`` files.

Each table sits in ``README.md`` between two markers::

  <!-- results:NAME begin -->
  ...generated, do not edit...
  <!-- results:NAME end -->

and is rendered from one JSON file by the renderer registered for ``NAME``
in :data:`TABLES`, so the README's numbers cannot drift from the data.

Usage (from the repository root)::

  python benchmarks/readme_results.py            # rewrite the tables in README.md
  python benchmarks/readme_results.py --check    # exit 1 if README.md is out of date
  python benchmarks/readme_results.py --source qat_study=benchmarks/results/qat_study/quick.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def _num(x: Optional[float], fmt: str) -> str:
  return "" if x is None else format(x, fmt)


def _bits(row: dict[str, Any]) -> str:
  return f"W{row['bits']}" if row["bits"] is not None else "full precision"


def render_qat_study(results: dict[str, Any], source: str) -> str:
  """The study's table, its caption and one sentence per TALR arm and bit width.

  Args:
    results: a ``benchmarks/qat_study.py`` results file.
    source: its path as the README should name it.

  Returns:
    Markdown (no trailing newline).
  """
  cfg, model, machine = results["config"], results["model"], results["machine"]
  rows = results["summary"]
  label = {r["arm"]: r["label"] for r in rows}
  load = machine.get("load_average_start")
  n_seeds = max(len(r["seeds"]) for r in rows)
  kind = ("smoke run (`--quick`): a tiny model and short runs, not evidence"
          if cfg.get("quick") else "full run")
  lines = [
      f"From `{source}` ({kind}): `TransformerLM` width {model['width']}, "
      f"{model['layers']} layer{'s' if model['layers'] > 1 else ''}, {model['quantized_parameters']:,} of its {model['parameters']:,} weights "
      f"quantized; {cfg['fp_steps']} pretraining steps, {cfg['steps']} QAT steps; each arm's "
      f"knob tuned on seed 0 over {max(len(a['values']) for a in results['arms'])} values, then "
      f"{n_seeds} other seeds. Validation bits per byte (mean ± std over seeds); "
      "the paired difference to the best baseline with its 95 % t-interval decides the "
      "conclusion. The full-precision reference is trained as long as pretraining plus QAT. "
      f"{results['seconds'] / 60:.1f} minutes on {machine['cpu_count']} cores "
      f"({machine['cpu_model']}"
      + (f", {'/'.join(machine['cpu_isa'])}" if machine.get("cpu_isa") else "")
      + (f", ONEDNN_MAX_CPU_ISA={machine['onednn_max_cpu_isa']}"
         if machine.get("onednn_max_cpu_isa") else "")
      + (f", 1-minute load {load[0]:.1f} at the start" if load else "") + ").",
      "",
      "| bits | arm | tuned | bits per byte | vs best baseline (95 % CI) | conclusion | "
      "\\|K-R\\|/R0 | late osc. | frozen |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    diff = ""
    if r["paired_diff_ci95"] is not None:
      low, high = r["paired_diff_ci95"]
      diff = f"{r['paired_diff_vs_best_baseline']:+.4f} [{low:+.4f}, {high:+.4f}] ({label[r['best_baseline']]})"
    lines.append(
        f"| {_bits(r)} | {r['label']} | {r['knob']} {r['tuned_value']:g} | "
        f"{r['mean']:.4f} ± {r['std']:.4f} | {diff} | {r['conclusion'] or ''} | "
        f"{_num(r['tracking_error'], '.3f')} | {_num(r['late_oscillation'], '.1e')} | "
        f"{_num(r['frozen_fraction'], '.3f')} |")
  lines.append("")
  for r in rows:
    if r["arm"].startswith("adamwt") and r["conclusion"] is not None:
      low, high = r["paired_diff_ci95"]
      verdict = {"better": "wins against", "worse": "loses to"}.get(
          r["conclusion"], "shows no detectable difference from")
      lines.append(f"- {_bits(r)}: {r['label']} {verdict} {label[r['best_baseline']]} "
                   f"({r['paired_diff_vs_best_baseline']:+.4f} bits/byte, 95 % CI "
                   f"[{low:+.4f}, {high:+.4f}], lower on {r['better_on_seeds']} of "
                   f"{len(r['seeds'])} seeds).")
  return "\n".join(lines).rstrip()


def render_ema_momentum(results: dict[str, Any], source: str) -> str:
  """The EMA momentum rule against fixed values, per run length.

  Args:
    results: a ``benchmarks/ema_momentum.py`` results file.
    source: its path as the README should name it.

  Returns:
    Markdown (no trailing newline).
  """
  lines = [
      f"From `{source}`: AdamWT W{results['bits']} on the demo's language model, "
      f"{results['seeds']} seeds; the rule's paired difference to each fixed value "
      "(95 % t-interval).",
      "",
      "| QAT steps | EMA momentum | bits per byte | \\|K-R\\|/R0 | rule minus this: bits per byte "
      "| rule minus this: \\|K-R\\|/R0 |",
      "|---|---|---|---|---|---|",
  ]
  def diff(row: dict[str, Any], key: str) -> str:
    if f"rule_minus_this_{key}" not in row:
      return ""
    low, high = row[f"rule_minus_this_{key}_ci95"]
    return f"{row[f'rule_minus_this_{key}']:+.4f} [{low:+.4f}, {high:+.4f}]"
  for r in results["summary"]:
    name = f"rule ({r['ema_momentum']:.4g})" if r["candidate"] == "rule" else r["candidate"]
    lines.append(f"| {r['steps']} | {name} | {r['final_bits_per_byte']:.4f} | "
                 f"{r['tracking_error']:.3f} | {diff(r, 'final_bits_per_byte')} | "
                 f"{diff(r, 'tracking_error')} |")
  return "\n".join(lines)


# name -> (default results file relative to the repository root, renderer)
TABLES: dict[str, tuple[str, Callable[[dict[str, Any], str], str]]] = {
    "qat_study": ("benchmarks/results/qat_study/results.json", render_qat_study),
    "ema_momentum": ("benchmarks/results/ema_momentum.json", render_ema_momentum),
}


def _pattern(name: str) -> re.Pattern[str]:
  return re.compile(rf"(<!-- results:{re.escape(name)} begin -->\n)(.*?)(<!-- results:"
                    rf"{re.escape(name)} end -->)", re.S)


def update(text: str, name: str, table: str) -> str:
  """``text`` with the block of ``name`` replaced by ``table``.

  Raises:
    ValueError: the README has no (or more than one) block of that name.
  """
  pattern = _pattern(name)
  if len(pattern.findall(text)) != 1:
    raise ValueError(f"README must hold exactly one '<!-- results:{name} begin -->' ... "
                     f"'<!-- results:{name} end -->' block")
  return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(3), text)


def render_all(text: str, sources: dict[str, str]) -> str:
  """Every registered block present in ``text``, regenerated from its source."""
  for name, (default, render) in TABLES.items():
    if f"<!-- results:{name} begin -->" not in text:
      continue
    source = sources.get(name, default)
    with open(ROOT / source) as f:
      text = update(text, name, render(json.load(f), source))
  return text


def sources_in(text: str) -> dict[str, str]:
  """The source each block names (``From `path` ...``), so a rewrite keeps it."""
  out = {}
  for name in TABLES:
    m = _pattern(name).search(text)
    found = m and re.search(r"From `([^`]+)`", m.group(2))
    if found:
      out[name] = found.group(1)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Rewrites (or with ``--check`` compares) the README's generated tables."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--readme", default=str(ROOT / "README.md"))
  ap.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
  ap.add_argument("--source", action="append", default=[],
                  help="NAME=PATH: render NAME's block from PATH (relative to the repository root)")
  args = ap.parse_args(argv)
  text = Path(args.readme).read_text()
  sources = sources_in(text)
  for item in args.source:
    name, _, path = item.partition("=")
    if name not in TABLES or not path:
      ap.error(f"--source must be NAME=PATH with NAME in {sorted(TABLES)}, got {item!r}")
    sources[name] = path
  new = render_all(text, sources)
  if args.check:
    if new != text:
      print(f"{args.readme} is out of date: run python benchmarks/readme_results.py")
      return 1
    print(f"{args.readme} matches its results files")
    return 0
  Path(args.readme).write_text(new)
  print(f"wrote the generated tables of {args.readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
