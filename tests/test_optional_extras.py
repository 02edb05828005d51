"""A core-only install: the core imports, the sub-packages name the extra they need.

Each case runs in a fresh interpreter where the optional modules are made
unimportable (``sys.modules[name] = None``, which is how Python reports a module
that is not installed: ``ModuleNotFoundError``).
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level modules of every optional dependency in pyproject.toml.
OPTIONAL = ("flax", "qwix", "sklearn", "orbax", "matplotlib", "rich", "chex")

_PROBE = """
import importlib, json, sys
for name in {blocked!r}:
  sys.modules[name] = None
out = {{}}
for module in {modules!r}:
  try:
    importlib.import_module(module)
    out[module] = None
  except ImportError as e:
    out[module] = [type(e).__name__, str(e), e.name]
print(json.dumps(out))
"""


def _import_without(blocked, modules):
  """``{module: None or [error type, message, missing name]}`` in a fresh process
  (``examples/`` on the path, so that ``quickstart`` is the example)."""
  code = _PROBE.format(blocked=tuple(blocked), modules=tuple(modules))
  path = os.pathsep.join([str(ROOT), str(ROOT / "examples")])
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "PYTHONPATH": path})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])


def test_core_only_install_imports_the_core_and_names_each_extra():
  out = _import_without(OPTIONAL, ["talr_optax", "talr_optax.nnx", "talr_optax.qwix"])
  assert out["talr_optax"] is None
  kind, message, name = out["talr_optax.nnx"]
  assert (kind, name) == ("ModuleNotFoundError", "flax")
  assert "talr_optax.nnx needs the optional dependency 'flax'" in message
  assert 'pip install -e ".[nnx]"' in message
  kind, message, name = out["talr_optax.qwix"]
  assert (kind, name) == ("ModuleNotFoundError", "flax")
  assert 'pip install -e ".[qwix]"' in message


def test_qwix_missing_with_flax_installed_names_the_qwix_extra():
  out = _import_without(["qwix"], ["talr_optax.nnx", "talr_optax.qwix"])
  assert out["talr_optax.nnx"] is None  # the nnx extra is enough for talr_optax.nnx
  kind, message, name = out["talr_optax.qwix"]
  assert (kind, name) == ("ModuleNotFoundError", "qwix")
  assert "talr_optax.qwix needs the optional dependency 'qwix'" in message
  assert 'pip install -e ".[qwix]"' in message


def _module_of(requirement: str) -> str:
  """The top-level module a pyproject requirement installs: 'scikit-learn>=1.4' -> 'sklearn'."""
  name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
  return {"scikit-learn": "sklearn", "orbax-checkpoint": "orbax"}.get(name, name)


def _installed_with(requirements) -> set[str]:
  """Top-level modules that installing ``requirements`` brings, with their own
  dependencies (e.g. Flax brings Rich and Orbax), read from the installed metadata."""
  names, todo = set(), [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements]
  while todo:
    name = todo.pop()
    if name in names:
      continue
    names.add(name)
    try:
      todo += [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower()
               for r in importlib.metadata.requires(name) or [] if "extra ==" not in r]
    except importlib.metadata.PackageNotFoundError:
      pass
  return {_module_of(name) for name in names}


def _readme_example_installs() -> dict[str, str]:
  """``{"quickstart": 'pip install -e . scikit-learn', ...}`` from the README's table."""
  rows = re.findall(r"^\| `examples/(\w+)\.py` \|.*\| `(pip install [^`]+)` \|$",
                    (ROOT / "README.md").read_text(), flags=re.M)
  return dict(rows)


def test_readme_names_an_install_for_every_example():
  assert sorted(_readme_example_installs()) == sorted(
      p.stem for p in (ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("example", sorted(p.stem for p in (ROOT / "examples").glob("*.py")))
def test_example_imports_with_only_what_the_readme_installs(example):
  # Every example imports all it needs at the top, so importing it (main is
  # not run) with the other optional modules missing proves the README's line.
  tomllib = pytest.importorskip("tomllib")
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]
  command = _readme_example_installs()[example]
  requirements = []
  for word in command.split()[3:]:  # after "pip install -e"
    group = re.fullmatch(r'"?\.(?:\[([\w,]+)\])?"?', word)
    if group is None:  # a package named next to the project
      requirements.append(word)
    else:
      for extra in filter(None, (group.group(1) or "").split(",")):
        requirements += extras[extra]
  allowed = _installed_with(requirements)
  blocked = [m for m in OPTIONAL if m not in allowed]
  out = _import_without(blocked, [example])
  assert out[example] is None, (
      f"README says `{command}` for examples/{example}.py, but with {blocked} missing "
      f"its import fails: {out[example]}")
