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
  """``qat_study.py``: the table, its caption, and a sentence per TALR arm and bit width."""
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
  talr_rows = [r for r in rows if r["arm"].startswith("adamwt") and r["conclusion"] is not None]
  # Losses first, then ties, then wins: where TALR loses is what a reader needs first.
  order = {"worse": 0, "no detectable difference": 1, "better": 2}
  talr_rows.sort(key=lambda r: (order.get(r["conclusion"], 1), r["bits"], r["arm"]))
  counts = {c: sum(r["conclusion"] == c for r in talr_rows) for c in order}
  if talr_rows:
    lines.append(f"TALR's arms against the best baseline of their bit width: worse in "
                 f"{counts['worse']}, no detectable difference in "
                 f"{counts['no detectable difference']}, better in {counts['better']} of "
                 f"{len(talr_rows)} comparisons.")
    lines.append("")
  for r in talr_rows:
    low, high = r["paired_diff_ci95"]
    verdict = {"better": "wins against", "worse": "loses to"}.get(
        r["conclusion"], "shows no detectable difference from")
    lines.append(f"- {_bits(r)}: {r['label']} {verdict} {label[r['best_baseline']]} "
                 f"({r['paired_diff_vs_best_baseline']:+.4f} bits/byte, 95 % CI "
                 f"[{low:+.4f}, {high:+.4f}], lower on {r['better_on_seeds']} of "
                 f"{len(r['seeds'])} seeds).")
  return "\n".join(lines).rstrip()


def render_qat_study_vs_adamw(results: dict[str, Any], source: str) -> str:
  """``qat_study.py``: every QAT arm against plain AdamW, the optimizer the others add to."""
  lines = [f"From `{source}`: each arm minus plain AdamW, paired over the seeds (95 % CI).", ""]
  for r in results["summary"]:
    if r.get("paired_diff_vs_adamw_ci95") is None:
      continue
    low, high = r["paired_diff_vs_adamw_ci95"]
    lines.append(f"- {_bits(r)}: {r['label']}: {r['conclusion_vs_adamw']} "
                 f"({r['paired_diff_vs_adamw']:+.4f} bits/byte [{low:+.4f}, {high:+.4f}], "
                 f"lower on {r['better_than_adamw_on_seeds']} of {len(r['seeds'])} seeds).")
  return "\n".join(lines)


def render_qat_study_tuning(results: dict[str, Any], source: str) -> str:
  """``qat_study.py``: each arm's tuning on seed 0, the values tried and the one chosen."""
  lines = [
      f"From `{source}`: final validation bits per byte on the tuning seed 0 for each "
      "value tried (**bold**: chosen, the lowest); an arm with a base runs at its base "
      "arm's chosen value.",
      "",
      "| bits | arm | knob | values tried (seed-0 bits per byte) | chosen at an end of the grid |",
      "|---|---|---|---|---|",
  ]
  for r in results["summary"]:
    tried = sorted(r["tuning"], key=lambda t: t["value"])
    cells = [(f"**{t['value']:g}: {t['seed0_bits_per_byte']:.4f}**"
              if t["value"] == r["tuned_value"] else
              f"{t['value']:g}: {t['seed0_bits_per_byte']:.4f}") for t in tried]
    edge = r["tuned_value"] in (tried[0]["value"], tried[-1]["value"])
    lines.append(f"| {_bits(r)} | {r['label']} | {r['knob']} | {', '.join(cells)} | "
                 f"{'yes' if edge else 'no'} |")
  return "\n".join(lines)


def render_ema_momentum(results: dict[str, Any], source: str) -> str:
  """``ema_momentum.py``: the EMA momentum rule against fixed values, per run length."""
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


def _machine(meta: dict[str, Any]) -> str:
  return f"{meta['cpu_model']}, {meta['cpu_count']} cores, jax {meta['jax']}"


def _ratio(row: dict[str, Any]) -> str:
  return f"{row['ratio']:.3f}x [{row['ratio_q1']:.2f}-{row['ratio_q3']:.2f}]"


def render_train_step(results: dict[str, Any], source: str) -> str:
  """``train_step.py``: a sentence on the whole step, SGDT against SGD, per model and style."""
  rows = {(r["model"], r["style"]): r for r in results["rows"] if r["variant"] == "sgdt"}
  names = {"cnn": "SmallCNN W2A2", "resnet20": "ResNet-20 W2A2"}
  parts = []
  for model in dict.fromkeys(m for m, _ in rows):
    nnx_row, fn_row = rows[(model, "nnx")], rows.get((model, "functional"))
    parts.append(f"{_ratio(nnx_row)} ({names.get(model, model)}, batch {nnx_row['batch']}"
                 + (f"; written functionally {_ratio(fn_row)}" if fn_row else "") + ")")
  return (f"From `{source}` ({_machine(results['meta'])}; median ratio over "
          f"{results['meta']['repeats']} interleaved rounds after warm-up, in brackets the "
          "quartiles of the paired per-round ratios; the times depend on the machine): a "
          "whole training step in the README's NNX loop costs, with SGDT against SGD, "
          + " and ".join(parts) + ".")


def render_optimizer_step(results: dict[str, Any], source: str) -> str:
  """``optimizer_step.py``: a sentence on the optimizer step alone, exact and sampled."""
  rows = results["rows"]
  exact = [r for r in rows if r["variant"] in ("sgdt", "adamt")]
  sampled = [r for r in rows if r["variant"].endswith("_sampled")]
  big = [r for r in sampled if r["n_weights"] >= 10_000_000]
  span = lambda sel: f"{min(r['ratio'] for r in sel):.2f}-{max(r['ratio'] for r in sel):.2f}x"
  millions = lambda sel: (f"{min(r['n_weights'] for r in sel) / 1e6:.0f}M-"
                          f"{max(r['n_weights'] for r in sel) / 1e6:.0f}M weights")
  return (f"From `{source}` ({_machine(results['meta'])}; ten conv-shaped tensors, all "
          f"{results['meta']['bits']}-bit; SGDT against SGD and AdamT against Adam): the "
          f"optimizer step alone costs {span(exact)} with exact counting ({millions(exact)}; "
          "on XLA:CPU the int8 levels and their count are extra passes) and "
          f"{span(big)} with `sample_size={results['meta']['sample_size']}` at "
          f"{millions(big)}.")


def render_state_bytes(results: dict[str, Any], source: str) -> str:
  """``state_bytes.py``: the optimizer-state bill of the Llama-2-7B-shaped tree (float32)."""
  rows = [r for r in results["rows"] if r["setting"] == "llama7b unstacked float32"]
  names = {"adam": "Adam", "adamt": "AdamT, exact counting",
           "adamt_sampled": "AdamT, `sample_size=65536`"}
  first = rows[0]
  lines = [
      f"From `{source}` (computed with `jax.eval_shape`, the same on any machine): a "
      f"Llama-2-7B-shaped model, {first['n_params'] / 1e9:.2f}B float32 parameters, every "
      f"attention and MLP kernel quantized ({first['n_quantized'] / 1e9:.2f}B weights).",
      "",
      "| optimizer | optimizer state | bytes per weight | extra per quantized weight |",
      "|---|---|---|---|",
  ]
  for r in rows:
    extra = "" if r["variant"] == r["baseline"] else f"{r['extra_bytes_per_quantized_weight']:.3f} B"
    lines.append(f"| {names.get(r['variant'], r['variant'])} | {r['state_bytes'] / 1e9:.2f} GB | "
                 f"{r['state_bytes_per_weight']:.3f} | {extra} |")
  return "\n".join(lines)


def render_bn_reestimation(results: dict[str, Any], source: str) -> str:
  """``bn_reestimation.py``: each method before and after, and SGDT minus SGD."""
  cfg, meta = results["config"], results["meta"]
  seeds = len({r["seed"] for r in results["runs"]})
  lines = [
      f"From `{source}`: MobileNetV2Tiny W{cfg['bits'][0]}A{cfg['bits'][0]} on digits, "
      f"{cfg['fp_epochs']} pretraining epochs (seed 0), {cfg['epochs']} QAT epochs, "
      f"{seeds} seeds, re-estimation over {results['bn_batches']} training batches; test "
      "accuracy (%), paired differences in percentage points with their 95 % t-interval. "
      f"{results['seconds'] / 60:.1f} minutes on {meta['cpu_count']} cores ({meta['cpu_model']}).",
      "",
      "| comparison | as trained | re-estimated | paired difference (95 % CI) | conclusion |",
      "|---|---|---|---|---|",
  ]
  for r in results["summary"]:
    low, high = r["ci95"]
    lines.append(f"| {r['comparison']} | {_num(r.get('mean_before'), '.2f')} | "
                 f"{_num(r.get('mean_after'), '.2f')} | {r['mean']:+.2f} [{low:+.2f}, {high:+.2f}] "
                 f"(higher on {r['higher_on']} of {seeds}) | {r['conclusion']} |")
  return "\n".join(lines)


# name -> (default results file relative to the repository root, renderer). A renderer
# takes the loaded results and the path the page should name, and returns Markdown
# without a trailing newline.
TABLES: dict[str, tuple[str, Callable[[dict[str, Any], str], str]]] = {
    "qat_study": ("benchmarks/results/qat_study/results.json", render_qat_study),
    "qat_study_vs_adamw": ("benchmarks/results/qat_study/results.json",
                           render_qat_study_vs_adamw),
    "qat_study_tuning": ("benchmarks/results/qat_study/results.json", render_qat_study_tuning),
    "ema_momentum": ("benchmarks/results/ema_momentum.json", render_ema_momentum),
    "train_step": ("benchmarks/results/train_step.json", render_train_step),
    "optimizer_step": ("benchmarks/results/optimizer_step.json", render_optimizer_step),
    "state_bytes": ("benchmarks/results/state_bytes.json", render_state_bytes),
    "bn_reestimation": ("benchmarks/results/bn_reestimation.json", render_bn_reestimation),
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
