"""The main job's CNN for scikit-learn's 8x8 digits, with its spec; trained weights ship with the package."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn

from ifjax._spec import Spec
from ifjax.models._zoo import Widths, _conv_group

DIGITS_WEIGHTS = Path(__file__).parent / "weights" / "digits_cnn.npz"


class DigitsCNN(nn.Module):
  """(batch, 8, 8, 1) -> (batch, num_classes) logits: three conv (3x3, SAME, bias) -> BN -> ReLU blocks, a 2x2
  max-pool after the second, global mean pooling and ``fc``. ``widths`` = ``((group name, channels), ...)``."""

  num_classes: int = 10
  widths: Widths = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = dict(self.widths)
    for i, default in enumerate((32, 64, 128)):
      x = nn.Conv(w.get(f"conv{i}", default), (3, 3), name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
      x = nn.relu(x)
      if i == 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def digits_cnn_spec() -> Spec:
  """conv0 -> conv1 -> conv2 -> fc, each conv with its BN (Flax's eps, 1e-5); what ``trace_spec`` finds."""
  groups = [_conv_group(f"conv{i}", [f"conv{i}"], [f"conv{i + 1}"] if i < 2 else [], fc="fc" if i == 2 else None)
            for i in range(3)]
  return Spec(tuple(groups), tuple((f"conv{i}", f"bn{i}") for i in range(3)))
