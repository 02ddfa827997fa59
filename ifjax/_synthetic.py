"""Calibration inputs without data: random inputs optimised until every BatchNorm sees its running statistics.

A trained network's BatchNorms remember the mean and variance of their inputs on the training data. Inputs
whose batch statistics reproduce those numbers at every BN are, to second order and layer by layer, what the
network saw in training: enough to re-estimate the BNs of a pruned network (:func:`ifjax.recalibrate_batchnorm`)
without a single real image. This is the "distilled data" of ZeroQ (Cai et al., CVPR 2020), used there for
quantisation; here it turns the data-light BN re-estimation of pruning into a data-free one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ifjax._batchnorm import train_mode_statistics
from ifjax._spec import flatten


class SyntheticInputs(NamedTuple):
  """What :func:`synthesize_inputs` made.

  Attributes:
    inputs: ``(count, *input_shape)`` float32 NumPy array.
    losses: ``(batches, steps + 1)`` the loss of each batch before each step and at the end:
      :func:`bn_statistics_gap` plus the input prior; the first column is the random start.
  """
  inputs: np.ndarray
  losses: np.ndarray


def _stat_paths(flat) -> list[str]:
  paths = sorted(p for p in flat if p.startswith("batch_stats/") and p.rsplit("/", 1)[1] in ("mean", "var"))
  if not paths:
    raise ValueError("the variables have no batch_stats (mean / var): there are no BatchNorm statistics to match")
  return paths


def _batch_statistics_fn(apply_fn: Callable[..., Any], variables: Any, example: jax.Array):
  """``x -> {batch_stats path: the BN's batch mean / (biased) variance on x}``, differentiable in x.

  A linen BN in train mode returns ``momentum * running + (1 - momentum) * batch``; with the running
  statistics set to 0 that is ``(1 - momentum) * batch``. The momentum is read once, from a second pass with
  the running statistics set to 1 (``momentum + (1 - momentum) * batch``), so any momentum works.
  """
  flat = flatten(variables)
  paths = _stat_paths(flat)
  updated = lambda x, fill: train_mode_statistics(apply_fn, flat, paths, x, fill)
  zero, one = updated(example, 0.0), updated(example, 1.0)
  keep = {p: np.asarray(1.0 - (one[p] - zero[p]), np.float32) for p in paths}  # 1 - momentum
  if any(np.any(k <= 0) for k in keep.values()):
    raise ValueError("a BatchNorm has momentum 1 (its running statistics never change in train mode), so its "
                     "batch statistics cannot be read")
  return lambda x: {p: a / keep[p] for p, a in updated(x, 0.0).items()}, {p: jnp.asarray(flat[p]) for p in paths}


def _gap(stats: dict, target: dict) -> jax.Array:
  """Sum over BNs of the RMS difference of the channel means plus that of the channel standard deviations."""
  total = jnp.zeros((), jnp.float32)
  for p, b in stats.items():
    t = target[p].astype(jnp.float32)
    if p.endswith("/var"):
      b, t = jnp.sqrt(jnp.maximum(b, 0.0) + 1e-5), jnp.sqrt(jnp.maximum(t, 0.0) + 1e-5)
    total = total + jnp.sqrt(jnp.mean(jnp.square(b - t)))
  return total


def bn_statistics_gap(apply_fn: Callable[..., Any], variables: Any, x: Any) -> float:
  """How far the BatchNorm batch statistics of inputs ``x`` are from the running statistics in ``variables``:
  the sum over BNs of the RMS difference of channel means and of channel standard deviations (0: every BN
  sees exactly its training statistics). ``apply_fn(v, x, train=True, mutable=["batch_stats"])``."""
  x = jnp.asarray(x, jnp.float32)
  stats_fn, target = _batch_statistics_fn(apply_fn, variables, x)
  return float(_gap(stats_fn(x), target))


def synthesize_inputs(apply_fn: Callable[..., Any], variables: Any, input_shape: tuple[int, ...], *,
                      count: int = 256, batch_size: int = 128, steps: int = 200, learning_rate: float = 0.1,
                      input_mean: float | Any = 0.0, input_std: float | Any = 1.0, seed: int = 0,
                      progress: bool = True) -> SyntheticInputs:
  """Data-free calibration inputs: ``count`` inputs of ``input_shape`` whose BN batch statistics match the
  running statistics of ``variables`` (ZeroQ's distilled data).

  Each batch starts as ``N(input_mean, input_std^2)`` noise and takes ``steps`` Adam steps on
  :func:`bn_statistics_gap` plus the gap between the batch's per-channel (last axis) mean / std and
  ``input_mean`` / ``input_std`` (the statistics of preprocessed inputs; 0 / 1 for standardised images).
  Nothing but the weights and BN statistics is used. Deterministic for a ``seed`` on one machine (XLA's
  CPU reductions can differ across thread counts and CPUs).

  Args:
    apply_fn: a Flax linen ``module.apply`` of the *original* network, called as ``apply_fn(v, x, train=True,
      mutable=["batch_stats"])`` (wrap it to pass e.g. a dropout rng).
    variables: its variables, with ``batch_stats``.
    input_shape: one input's shape, e.g. ``(32, 32, 3)``.
    count: inputs to make, in batches of ``batch_size`` (the last may be smaller).
    batch_size: inputs optimised together (>= 2: a BN needs a batch).
    steps: Adam steps per batch (0: the starting noise).
    learning_rate: Adam's learning rate.
    input_mean: per-channel mean of the inputs (a scalar or one value per channel of the last axis).
    input_std: per-channel standard deviation of the inputs (a scalar or one value per channel).
    seed: seed of the starting noise.
    progress: show a progress bar over the batches.

  Returns:
    :class:`SyntheticInputs`: the inputs and each batch's loss at every step.

  Use the inputs as the ``batches`` of :func:`ifjax.recalibrate_batchnorm`.
  """
  if count < 1 or batch_size < 2:
    raise ValueError(f"count must be >= 1 and batch_size >= 2 (a BN needs a batch), got {count}, {batch_size}")
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  shape = tuple(int(s) for s in input_shape)
  mean = jnp.broadcast_to(jnp.asarray(input_mean, jnp.float32), shape[-1:])
  std = jnp.broadcast_to(jnp.asarray(input_std, jnp.float32), shape[-1:])
  key = jax.random.key(seed)
  stats_fn, target = _batch_statistics_fn(apply_fn, variables, jnp.zeros((2, *shape), jnp.float32))
  axes = tuple(range(len(shape)))

  def loss(x):
    prior = (jnp.sqrt(jnp.mean(jnp.square(x.mean(axes) - mean)))
             + jnp.sqrt(jnp.mean(jnp.square(x.std(axes) - std))))
    return _gap(stats_fn(x), target) + prior

  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(x, state):
    value, grad = jax.value_and_grad(loss)(x)
    updates, state = optimizer.update(grad, state, x)
    return optax.apply_updates(x, updates), state, value

  final_loss = jax.jit(loss)
  sizes = [min(batch_size, count - i) for i in range(0, count, batch_size)]
  if sizes[-1] < 2:  # a batch of one has no variance: give it a neighbour's input
    sizes[-2:] = [sizes[-2] - 1, 2]
  from ifjax.train import _bar
  bar = _bar(progress, len(sizes) * steps, "synthesize")
  inputs, losses = [], []
  for b, size in enumerate(sizes):
    x = mean + std * jax.random.normal(jax.random.fold_in(key, b), (size, *shape), jnp.float32)
    state, history = optimizer.init(x), []
    for _ in range(steps):
      x, state, value = step(x, state)
      history.append(value)
      if bar is not None:
        bar.update(1)
    history.append(final_loss(x))
    inputs.append(np.asarray(x))
    losses.append(np.asarray(jnp.stack(history)))
  if bar is not None:
    bar.close()
  return SyntheticInputs(np.concatenate(inputs), np.stack(losses))
