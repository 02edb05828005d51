"""One process of ``examples/multiprocess_training.py``, with its results written out.

Started by ``tests/test_multiprocess.py`` (once per process):

  python _multiprocess_run.py --out DIR [arguments of the example...]

Runs the example's ``main`` (training, checkpoint, restore, resume; process 0
prints the example's report) and writes ``DIR/process<i>.json`` (metrics of
every step, losses, mesh, checks) and ``DIR/process<i>.npz`` (the gathered
train states ``final``, ``saved``, ``restored`` and ``resumed``, one entry per
array, keyed ``<state>/<tree path>``).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import multiprocess_training as example  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

STATES = ("final", "saved", "restored", "resumed")


def main(argv: list[str]) -> None:
  i = argv.index("--out")
  out, rest = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
  r = example.main(rest)
  arrays = {}
  for name in STATES:
    for path, value in jax.tree_util.tree_flatten_with_path(r.pop(name))[0]:
      arrays[f"{name}/{jax.tree_util.keystr(path)}"] = np.asarray(value)
  out.mkdir(parents=True, exist_ok=True)
  np.savez(out / f"process{r['process']}.npz", **arrays)
  tmp = out / f"process{r['process']}.json.tmp"
  tmp.write_text(json.dumps(r))
  os.replace(tmp, out / f"process{r['process']}.json")


if __name__ == "__main__":
  main(sys.argv[1:])
