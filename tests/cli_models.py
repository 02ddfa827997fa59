"""Small models for the ``ifjax trace`` runs of tests/test_cli.py, which load this file by its path."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ConvNet(nn.Module):
  """(batch, 8, 8, 3) -> (batch, 3): conv (6) -> BN -> ReLU -> mean over space -> dense (5) -> ReLU -> dense."""

  sort_hidden: bool = False  # sort the hidden features: an op trace_spec cannot follow
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(nn.Conv(6, (3, 3), name="conv")(x)))
    h = self.act(nn.Dense(5, name="hidden")(x.mean(axis=(1, 2))))
    return nn.Dense(3, name="out")(jnp.sort(h, axis=-1) if self.sort_hidden else h)


def linen_net():
  """A linen module: ``ifjax trace ...:linen_net --input-shape 2,8,8,3 --kwarg train=False``."""
  return ConvNet()


def apply_triple():
  """``(apply_fn, variables, example_args, example_kwargs)`` of the same network."""
  x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
  variables = jax.jit(ConvNet().init)(jax.random.key(0), x)
  return ConvNet().apply, variables, (x,), {"train": False}


def sorted_net():
  """A module whose hidden features are sorted: trace_spec raises UnsupportedPrimitiveError."""
  return ConvNet(sort_hidden=True)


def tanh_net():
  """tanh after ``hidden``: not positively homogeneous, so ``check_spec(..., scaling=True)`` rejects that group."""
  return ConvNet(act=jnp.tanh)


class NnxMlp(nnx.Module):
  """(batch, 3) -> (batch, 2) through 4 hidden ReLU units, in flax.nnx."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(3, 4, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def nnx_net():
  """An NNX module: ``ifjax trace ...:nnx_net --input-shape 2,3``."""
  return NnxMlp(nnx.Rngs(0))


NOT_A_MODEL = 42
