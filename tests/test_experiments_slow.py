"""Long experiments (opt-in: ``python -m pytest -m slow``).

They check on real data (digits) what the paper (Lee et al., ICCV 2025)
predicts: K follows the target, U ends far below its peak as R goes to 0, and
QAT reaches a useful accuracy. A few minutes on 2 CPU cores.
"""

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

from talr_optax import demo  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("rule", ["multiplicative", "additive"])
def test_talr_tracks_the_target_on_digits(tmp_path, rule):
  results = demo.run(demo.config_from_args(
      ["--bits", "2", "--seeds", "1", "--epochs", "50", "--rule", rule, "--out", str(tmp_path)]))
  talr_run = next(r for r in results["runs"] if r["method"] == "talr")
  trace = talr_run["trace"]
  # K within 30 % of R_0 on average after the warm-up.
  assert talr_run["tracking_error"] < 0.3
  # U rises above the base rate, then falls as R goes to 0. The additive rule
  # moves U by at most lr * R per step, so within this run it comes down less
  # far (measured: to about a quarter of its peak, against 1 % for the
  # multiplicative rule).
  peak = max(trace["U"])
  assert peak > 1.5 * trace["U"][0]
  assert trace["U"][-1] < (0.35 if rule == "additive" else 0.05) * peak
  # The per-step change decays with the target: last tenth << first tenth.
  k = np.asarray(trace["k"])
  assert k[-len(k) // 10:].mean() < 0.3 * k[: len(k) // 10].mean()
  assert talr_run["final_test_accuracy"] > 0.9
