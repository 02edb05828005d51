"""A core-only install: the core imports, the sub-packages name the extra they need.

Each case runs in a fresh interpreter where the optional modules are made
unimportable (``sys.modules[name] = None``, which is how Python reports a module
that is not installed: ``ModuleNotFoundError``).
"""

import json
import os
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
  """``{module: None or [error type, message, missing name]}`` in a fresh process."""
  code = _PROBE.format(blocked=tuple(blocked), modules=tuple(modules))
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
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
