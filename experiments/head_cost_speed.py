"""Cost-path timing for attention head groups (issue 21 item 3): few neurons x long vectors.

    python experiments/head_cost_speed.py [--layers 4] [--skip-model]

Times ``kept_distance`` of a BERT-base head group (12 neurons of 196,608 numbers, 6 kept, p = 1) and, unless
``--skip-model``, ``ifjax.intra_fuse`` at 0.5 of a random-init BERT-base-shaped encoder (hidden 768, 12 heads,
MLP 3072, ``--layers`` layers, traced), each with the direct path (SciPy's cdist for few neurons) and with it
switched off (every large cost through the 256 x 256 compiled tiles: the code before the change), in one process.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ifjax
from ifjax import _transport


class Layer(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name="ln1")(x + nn.MultiHeadDotProductAttention(12, name="attn")(x))
    return nn.LayerNorm(name="ln2")(x + nn.Dense(768, name="out")(nn.gelu(nn.Dense(3072, name="mlp")(x))))


class Encoder(nn.Module):
  layers: int = 4

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(1000, 768, name="embed")(ids)
    for i in range(self.layers):
      x = Layer(name=f"layer{i}")(x)
    return x.mean(1)


def _timed(fn, repeat=3):
  best = np.inf
  for _ in range(repeat):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return best, out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--skip-model", action="store_true")
  args = ap.parse_args()
  x = np.asarray(_transport.normalize_rows(np.random.default_rng(0).normal(size=(12, 196608)).astype(np.float32)))
  keep = np.arange(0, 12, 2)
  saved = dict(_transport._DIRECT_SPEED), _transport._DIRECT_SPEED_POWER
  results = {}
  for label, off in (("direct", False), ("tiles", True)):
    if off:
      _transport._DIRECT_SPEED, _transport._DIRECT_SPEED_POWER = {}, np.inf
    np.asarray(_transport.kept_distance(x, keep, 1.0))
    t, cost = _timed(lambda: np.asarray(_transport.kept_distance(x, keep, 1.0)))
    results[label] = cost
    print(f"head group cost 12 x 6 x 196608, p=1, {label}: {t:.3f} s")
    _transport._DIRECT_SPEED, _transport._DIRECT_SPEED_POWER = saved
  print(f"max relative difference: {np.max(np.abs(results['direct'] - results['tiles']) / results['tiles'].max()):.2e}")
  if args.skip_model:
    return
  module, ids = Encoder(args.layers), jnp.zeros((1, 8), jnp.int32)
  variables = module.init(jax.random.key(0), ids)
  spec = ifjax.trace_spec(module.apply, variables, ids)
  heads = [g.name for g in spec.groups if g.name.endswith(":heads")]
  print(f"{len(spec.groups)} groups, {len(heads)} head groups")
  for label, off in (("direct", False), ("tiles", True)):
    if off:
      _transport._DIRECT_SPEED, _transport._DIRECT_SPEED_POWER = {}, np.inf
    for what, groups in (("head groups", heads), ("all exact groups", [g.name for g in spec.groups if g.exact])):
      t, _ = _timed(lambda: jax.block_until_ready(ifjax.intra_fuse(variables, spec, 0.5, groups=groups)), repeat=2)
      print(f"intra_fuse 0.5, {args.layers}-layer BERT-base shape, {what}, {label}: {t:.2f} s")
    _transport._DIRECT_SPEED, _transport._DIRECT_SPEED_POWER = saved


if __name__ == "__main__":
  main()
