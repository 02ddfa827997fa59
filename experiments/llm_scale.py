r"""Intra-Fusion of the MLP groups of a Llama-3.2-1B-shaped model on this CPU: wall time and peak memory.

    python experiments/llm_scale.py --solver exact --out docs/results/llm_scale
    python experiments/llm_scale.py --solver sinkhorn --out docs/results/llm_scale

The model is random-initialised at Llama-3.2-1B's shapes (16 layers, hidden 2048, MLP 8192, 32 query heads
sharing 8 KV heads of 64, vocabulary 128,256, tied embeddings: 1.24 B parameters, 4.9 GB in float32), as NumPy
arrays (no jax copy). Its 16 MLP groups (gate and up producers, down consumer) are fused at 25% sparsity with
``ifjax.intra_fuse`` (l1 importance, ``paper`` maps, the cost's ``--p``). The groups are the ones ``trace_spec``
finds on a 2-layer model of the same shapes (checked here), written out for 16 layers so that tracing does not
copy 4.9 GB.

Reports the fusion's wall time and the process's peak resident memory (``ru_maxrss``) against the weights'
bytes; appends a row to ``--out/results.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shlex
import sys
import time

import numpy as np

import _report

FIELDS = ("solver", "p", "layers", "sparsity", "params", "weights_gb", "fuse_s", "peak_rss_gb", "peak_over_weights",
          "loadavg", "cpus")


def config(layers: int):
  from ifjax.models._llama import LlamaConfig
  return LlamaConfig(vocab=128256, hidden=2048, mlp=8192, layers=layers, heads=32, kv_heads=8, head_dim=64,
                     rope_base=500000.0, tied=True)


def random_variables(c, seed: int = 0) -> dict:
  """NumPy float32 variables in the layout of :class:`ifjax.models._llama.Llama` (shapes from its init)."""
  import jax
  import jax.numpy as jnp

  from ifjax.models._llama import Llama
  shapes = jax.eval_shape(Llama(c).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = jax.tree_util.keystr(path)
    if "rotary" in name:
      from ifjax.models._llama import rotary_frequencies
      return rotary_frequencies(c.head_dim, c.rope_base).astype(np.float32)
    if leaf.ndim == 1:
      return np.ones(leaf.shape, np.float32)
    fan_in = leaf.shape[0] if "embed" not in name else 1
    out = rng.standard_normal(leaf.shape, dtype=np.float32)
    out *= np.float32(0.02 if "embed" in name else 1 / np.sqrt(fan_in))
    return out

  return jax.tree_util.tree_map_with_path(make, shapes)


def mlp_spec(layers: int):
  import ifjax
  return ifjax.Spec([ifjax.Group(f"layer{i}/mlp/gate",
                                 [(f"params/layer{i}/mlp/gate/kernel", 1), (f"params/layer{i}/mlp/up/kernel", 1)],
                                 [(f"params/layer{i}/mlp/down/kernel", 0)]) for i in range(layers)])


def check_against_trace() -> None:
  """The hand-written MLP groups equal the traced ones on a 2-layer model of the same shapes (small vocab)."""
  import dataclasses

  import jax.numpy as jnp

  import ifjax
  from ifjax.models._llama import Llama
  c = dataclasses.replace(config(2), vocab=64, hidden=64, mlp=128, heads=4, kv_heads=2, head_dim=16)
  v = random_variables(c)
  traced = ifjax.trace_spec(Llama(c).apply, v, jnp.zeros((1, 4), jnp.int32))
  mine = {g.name: sorted((m.path, m.axis) for m in g.members) for g in mlp_spec(2).groups}
  found = {g.name: sorted((m.path, m.axis) for m in g.members) for g in traced.groups if g.name in mine}
  if found != mine:
    raise SystemExit(f"the traced MLP groups differ from the hand-written ones: {found} vs {mine}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--solver", default="exact", choices=["exact", "sinkhorn"])
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--sparsity", type=float, default=0.25)
  parser.add_argument("--p", type=float, default=1.0, help="the cost's p-norm (1: the authors'; 2: a matmul)")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  check_against_trace()
  import jax

  import ifjax
  c = config(args.layers)
  variables = random_variables(c)
  leaves = jax.tree_util.tree_leaves(variables)
  params, nbytes = sum(x.size for x in leaves), sum(x.nbytes for x in leaves)
  print(f"{params / 1e9:.3f} B parameters, {nbytes / 1e9:.2f} GB; fusing {args.layers} MLP groups of {c.mlp} at "
        f"{args.sparsity} with {args.solver}", flush=True)
  spec = mlp_spec(args.layers)
  t0 = time.perf_counter()
  small = ifjax.intra_fuse(variables, spec, args.sparsity, solver=args.solver, p=args.p)
  jax.block_until_ready(small)
  fuse_s = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  assert small["params"]["layer0"]["mlp"]["gate"]["kernel"].shape == (c.hidden, ifjax.kept_count(c.mlp,
                                                                                                  args.sparsity))
  row = dict(solver=args.solver, p=args.p, layers=args.layers, sparsity=args.sparsity, params=params,
             weights_gb=f"{nbytes / 1e9:.2f}", fuse_s=f"{fuse_s:.1f}", peak_rss_gb=f"{peak / 1e9:.2f}",
             peak_over_weights=f"{peak / nbytes:.2f}", loadavg=" ".join(f"{x:.1f}" for x in os.getloadavg()),
             cpus=f"{os.cpu_count()} ({platform.processor() or platform.machine()})")
  print(row, flush=True)
  with _report.CsvAppender(args.out / "results.csv", FIELDS) as sink:
    sink.add(row)
  (args.out / f"command_{args.solver}_p{args.p:g}.json").write_text(json.dumps(
      {"command": "python " + " ".join(map(shlex.quote, sys.argv))}))


if __name__ == "__main__":
  main()
