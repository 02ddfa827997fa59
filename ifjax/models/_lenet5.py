"""LeNet5 of advertorch (MNIST; NCHW flatten before the first Dense), with its spec and torch key map."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ifjax._spec import Group, Spec
from ifjax.models._cifar_resnet import _PAD
from ifjax.models._zoo import Widths


class LeNet5(nn.Module):
  """(batch, 28, 28, 1) -> logits: conv1 -> ReLU -> pool -> conv2 -> ReLU -> pool -> NCHW flatten -> linear1
  -> linear2."""

  num_classes: int = 10
  widths: Widths = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = dict(self.widths)
    x = nn.max_pool(nn.relu(nn.Conv(w.get("conv1", 32), (3, 3), padding=_PAD, name="conv1")(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(w.get("conv2", 64), (3, 3), padding=_PAD, name="conv2")(x)), (2, 2), (2, 2))
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # NCHW flatten, as the PyTorch original
    x = nn.relu(nn.Dense(w.get("linear1", 200), name="linear1")(x))
    return nn.Dense(self.num_classes, name="linear2")(x)


def lenet5_spec() -> Spec:
  """conv1, conv2 (read by linear1 through the NCHW flatten: each channel is a block of 7 * 7 features), linear1."""
  return Spec((
      Group("conv1", [("params/conv1/kernel", 3), ("params/conv1/bias", 0)], [("params/conv2/kernel", 2)]),
      Group("conv2", [("params/conv2/kernel", 3), ("params/conv2/bias", 0)], [("params/linear1/kernel", 0, 0, 1, 49)]),
      Group("linear1", [("params/linear1/kernel", 1), ("params/linear1/bias", 0)], [("params/linear2/kernel", 0)]),
  ))


def lenet5_torch_keys() -> dict[str, tuple[str, str]]:
  keys = {}
  for name, layout in (("conv1", "conv"), ("conv2", "conv"), ("linear1", "dense"), ("linear2", "dense")):
    keys[f"params/{name}/kernel"] = (f"{name}.weight", layout)
    keys[f"params/{name}/bias"] = (f"{name}.bias", "vector")
  return keys
