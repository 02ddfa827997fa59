"""The paper's Table 9: parameters left when every group is pruned to a neuron sparsity (no weights needed).

    python experiments/param_counts.py --model vgg11_bn resnet18

Counts kernels (conv and linear weights, what the paper's ResNet18 column counts) and all parameters of the
zoo models rebuilt at ``kept_count(n, s)`` neurons per group; shapes only (``jax.eval_shape``), so it takes
seconds.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import ifjax


def counts(name: str, sparsity: float) -> tuple[int, int]:
  """(kernel weights, all parameters) of zoo model ``name`` with every group at ``sparsity``."""
  module, spec = ifjax.models.get(name)
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  sizes = spec.validate(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  small, _ = ifjax.models.get(name, widths={g: ifjax.kept_count(n, sparsity) for g, n in sizes.items()})
  leaves = jax.tree_util.tree_flatten_with_path(jax.eval_shape(small.init, jax.random.key(0), x)["params"])[0]
  kernels = sum(int(np.prod(a.shape)) for p, a in leaves if jax.tree_util.keystr(p).endswith("['kernel']"))
  return kernels, sum(int(np.prod(a.shape)) for _, a in leaves)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", nargs="+", default=["vgg11_bn", "resnet18"])
  ap.add_argument("--sparsities", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8])
  args = ap.parse_args(argv)
  print("| model | neuron sparsity | kernel weights | all parameters | weight sparsity (kernels) |")
  print("|---|---|---|---|---|")
  for name in args.model:
    dense, dense_all = counts(name, 0.0)
    print(f"| {name} | 0 | {dense:,} | {dense_all:,} | – |")
    for s in args.sparsities:
      k, a = counts(name, s)
      print(f"| {name} | {s:g} | {k:,} | {a:,} | {1 - k / dense:.1%} |")


if __name__ == "__main__":
  main()
