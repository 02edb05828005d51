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


_ORDER = {"worse": 0, "no detectable difference": 1, "better": 2}
_VERB = {"worse": "loses to", "no detectable difference": "shows no detectable difference from",
         "better": "wins against"}


def _width(task: str, bits: Optional[int]) -> str:
  if bits is None:
    return "full precision"
  return f"W{bits}A{bits}" if task == "conv" else f"W{bits}"


def _score_fmt(task: str) -> str:
  return ".2f" if task == "conv" else ".4f"


def _unit(task: str) -> str:
  return "points" if task == "conv" else "bits/byte"


def _interval(v: dict[str, Any], task: str) -> str:
  f = "+" + _score_fmt(task)
  low, high = v["ci95"]
  return f"{v['mean']:{f}} {_unit(task)} [{low:{f}}, {high:{f}}]"


_KNOB = {"lr": "lr", "lam": "lambda", "strength": "strength", "threshold": "threshold"}


def _caption(results: dict[str, Any], source: str) -> str:
  """What the file holds: task, model, lengths, seeds, tuning budget, time and machine."""
  task, cfg, machine = results["task"], results["config"], results["machine"]
  name = task["name"]
  load = machine.get("load_average")
  seeds = cfg["seeds"]
  if name == "lm":
    m, lm = task["model"], cfg["lm"]
    what = (f"`TransformerLM` width {m['width']}, {m['layers']} layers, "
            f"{m['quantized_parameters']:,} of its {m['parameters']:,} weights quantized; "
            f"{lm['fp_steps']} pretraining steps, {lm['steps']} QAT steps; AdamW; validation "
            "bits per byte")
  else:
    m, d, conv = task["model"], task["data"], cfg["conv"]
    what = (f"`MobileNetV2Tiny`, weights and activations quantized, "
            f"{m['quantized_parameters']:,} of its {m['parameters']:,} weights; digits, "
            f"{d['train_images']} training and {d['test_images']} test images; "
            f"{conv['fp_epochs']} pretraining epochs, {conv['epochs']} QAT epochs "
            f"({task['steps']} steps); SGD; test error (%) after batch-norm re-estimation")
  kind = ("smoke run (`--quick`): a tiny setting and short runs, not evidence"
          if cfg.get("quick") else "full run")
  return (f"From `{source}` ({kind}): {what}. Each arm's knob tuned on seed 0 (at most "
          f"{results['settings']['max_tuning_runs']} values, extended until the choice is "
          f"interior), then {seeds} other seeds; paired 95 % t-intervals. "
          f"{results['seconds'] / 60:.1f} minutes on {machine['cpu_count']} cores "
          f"({machine['cpu_model']}"
          + (f", {'/'.join(machine['cpu_isa'])}" if machine.get("cpu_isa") else "")
          + (f", 1-minute load {load[0]:.1f} at the start" if load else "") + ").")


def render_study_verdicts(results: dict[str, Any], source: str) -> str:
  """``qat_study.py``: the verdicts, TALR's losses first, and the caveats."""
  s, name = results["summary"], results["task"]["name"]
  labels = {r["arm"]: r["label"] for r in s["rows"]}
  lines = [_caption(results, source), ""]
  verdicts = sorted(s["verdicts"], key=lambda v: (_ORDER[v["conclusion"]], v["bits"]))
  counts = {c: sum(v["conclusion"] == c for v in verdicts) for c in _ORDER}
  lines.append(f"TALR's arms in these comparisons: worse in {counts['worse']}, no detectable "
               f"difference in {counts['no detectable difference']}, better in "
               f"{counts['better']} of {len(verdicts)}.")
  lines.append("")
  for v in verdicts:
    n = v["n"]
    lines.append(f"- {_width(name, v['bits'])}, {v['comparison']}: {labels[v['arm']]} "
                 f"{_VERB[v['conclusion']]} {labels[v['reference']]} ({_interval(v, name)}, "
                 f"lower on {v['lower_on']} of {n} seeds).")
  edges = s["at_grid_edge"]
  if edges:
    lines.append("")
    lines.append("Caveat, first: " + "; ".join(
        f"{_width(name, e['bits'])} {labels[e['arm']]}'s chosen value {e['chosen']:g} is at an "
        "end of its grid" for e in edges) + ".")
  else:
    lines.append("")
    lines.append("Every tuned arm's chosen value is interior to its grid (both neighbours "
                 "tried and worse, or diverged).")
  return "\n".join(lines)


def render_study_table(results: dict[str, Any], source: str) -> str:
  """``qat_study.py``: every arm's row (mean, interval against the best baseline, diagnostics)."""
  s, name = results["summary"], results["task"]["name"]
  labels = {r["arm"]: r["label"] for r in s["rows"]}
  f = _score_fmt(name)
  conv = name == "conv"
  header = ["bits", "arm", "tuned", "score", "vs best baseline (95 % CI)", "conclusion"]
  if conv:
    header[3:3] = ["as trained"]
    header += ["re-estimation effect"]
  header += ["\\|K-R\\|/R0", "late osc.", "frozen"]
  lines = [_caption(results, source), "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for r in s["rows"]:
    v = r.get("vs_best_baseline")
    tuned = "" if r["knob"] is None else f"{_KNOB[r['knob']]} {r['chosen']:g}"
    cells = [_width(name, r["bits"]), r["label"], tuned, f"{r['mean']:{f}} ± {r['std']:{f}}",
             "" if v is None else f"{_interval(v, name)} vs {labels[v['reference']]}",
             "" if v is None else v["conclusion"]]
    if conv:
      cells[3:3] = [_num(r.get("mean_as_trained"), f)]
      e = r.get("reestimation_effect")
      cells += ["" if e is None else f"{e['mean']:+.2f} [{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}]"]
    cells += [_num(r["tracking_error"], ".3f"), _num(r["late_oscillation"], ".1e"),
              _num(r["frozen_fraction"], ".3f")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def render_study_vs_base(results: dict[str, Any], source: str) -> str:
  """``qat_study.py``: every arm against the task's plain optimizer, the one the others add to."""
  s, name = results["summary"], results["task"]["name"]
  rows = [r for r in s["rows"] if r.get("vs_base")]
  base = {r["arm"]: r["label"] for r in s["rows"]}[rows[0]["vs_base"]["reference"]] if rows else ""
  lines = [f"From `{source}`: each arm minus plain {base}, paired over the evaluation seeds "
           "(95 % CI).", ""]
  for r in rows:
    v = r["vs_base"]
    lines.append(f"- {_width(name, r['bits'])}: {r['label']}: {v['conclusion']} "
                 f"({_interval(v, name)}, lower on {v['lower_on']} of {v['n']} seeds).")
  return "\n".join(lines)


def render_study_tuning(results: dict[str, Any], source: str) -> str:
  """``qat_study.py``: each tuned arm's values tried on seed 0 and the one chosen."""
  s, name = results["summary"], results["task"]["name"]
  f = _score_fmt(name)
  lines = [f"From `{source}`: the score on the tuning seed 0 of every value tried (**bold**: "
           "chosen, the lowest); an arm that needs another arm's value runs at its chosen one.",
           "", "| bits | arm | knob | values tried (seed-0 score) | interior |", "|---|---|---|---|---|"]
  for r in s["rows"]:
    if r["knob"] is None:
      continue
    cells = []
    for t in sorted(r["tried"], key=lambda t: t["value"]):
      score = t["seed0"]
      text = f"{t['value']:.3g}: " + ("diverged" if score is None or score != score
                                      else format(score, f))
      cells.append(f"**{text}**" if t["value"] == r["chosen"] else text)
    lines.append(f"| {_width(name, r['bits'])} | {r['label']} | {_KNOB[r['knob']]} | "
                 f"{', '.join(cells)} | {'yes' if r['interior'] else 'no'} |")
  return "\n".join(lines)


def render_study_rules(results: dict[str, Any], source: str) -> str:
  """``qat_study.py --rules``: the measured-R_0 rules on the tuning seed."""
  name = results["task"]["name"]
  f = _score_fmt(name)
  rules = list(results["rules"])
  lines = [f"From `{source}`: seed 0, at the base optimizer's learning rate tuned on seed 0; "
           "the measured `R_0` is the mean over rate groups.", "",
           "| bits | base optimizer (lr) | " + " | ".join(f"`{r}`: score (R0)" for r in rules) + " |",
           "|" + "---|" * (2 + len(rules))]
  for row in results["rows"]:
    cells = [f"{row['rules'][r]['seed0']:{f}} ({row['rules'][r]['r0']:.1e})" for r in rules]
    lines.append(f"| {_width(name, row['bits'])} | {row['base_seed0']:{f}} "
                 f"({row['base_lr']:g}) | " + " | ".join(cells) + " |")
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


# name -> (default results file relative to the repository root, renderer). A renderer
# takes the loaded results and the path the page should name, and returns Markdown
# without a trailing newline.
TABLES: dict[str, tuple[str, Callable[[dict[str, Any], str], str]]] = {
    **{f"study_{t}": (f"benchmarks/results/qat_study/{t}.json", render_study_verdicts)
       for t in ("lm", "conv")},
    **{f"study_{t}_table": (f"benchmarks/results/qat_study/{t}.json", render_study_table)
       for t in ("lm", "conv")},
    **{f"study_{t}_tuning": (f"benchmarks/results/qat_study/{t}.json", render_study_tuning)
       for t in ("lm", "conv")},
    **{f"study_{t}_vs_base": (f"benchmarks/results/qat_study/{t}.json", render_study_vs_base)
       for t in ("lm", "conv")},
    **{f"study_{t}_rules": (f"benchmarks/results/qat_study/{t}_rules.json", render_study_rules)
       for t in ("lm", "conv")},
    "ema_momentum": ("benchmarks/results/ema_momentum.json", render_ema_momentum),
    "train_step": ("benchmarks/results/train_step.json", render_train_step),
    "optimizer_step": ("benchmarks/results/optimizer_step.json", render_optimizer_step),
    "state_bytes": ("benchmarks/results/state_bytes.json", render_state_bytes),
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
  if not any(f"<!-- results:{name} begin -->" in text for name in TABLES):
    print(f"{args.readme} holds no generated block (<!-- results:NAME begin -->, NAME in "
          f"{sorted(TABLES)}): nothing to {'check' if args.check else 'write'}")
    return 1
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
