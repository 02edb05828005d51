"""The settings of a demo run, and the constants of the reference setup."""

from __future__ import annotations

import dataclasses

# The two QAT runs made from each pretrained model: the baseline and TALR.
METHODS = ("sgd", "talr")
# Names of the two methods in tables and figures, per --optimizer.
METHOD_LABELS = {
    "sgd": {"sgd": "SGD", "talr": "SGDT"},
    "adam": {"sgd": "Adam", "talr": "AdamT"},
}
BASE_LR = {"sgd": 0.1, "adam": 1e-3}
WEIGHT_DECAY = 1e-4
MOMENTUM = 0.9
ACT_SCALE_LR = 0.01
# Epochs of a --quick run (QAT, full-precision pretraining), whatever the data.
QUICK_EPOCHS = (6, 4)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything a demo run depends on (written to ``results.json``)."""

  dataset: str = "digits"
  model: str = "cnn"
  bits: tuple[int, ...] = (2, 1)
  seeds: int = 3
  epochs: int = 60
  fp_epochs: int = 15
  batch_size: int = 32
  optimizer: str = "sgd"
  rule: str = "multiplicative"
  lam: float = 5e-3
  # Weights counted per quantized tensor (a fixed strided grid); None counts all.
  sample_size: int | None = None
  data_dir: str | None = None
  out: str = "runs/demo"
  checkpoint_dir: str | None = None

  @property
  def labels(self) -> dict[str, str]:
    """Display names of the baseline and TALR methods."""
    return METHOD_LABELS[self.optimizer]


class UsageError(ValueError):
  """A flag whose value does not fit: the command line exits with status 2.

  Raised for what can only be checked once the data is loaded (e.g. a
  ``--batch-size`` larger than the training set), before any training.
  """
