r"""CPU throughput of a pretrained transformer, dense and resized after pruning its MLP neurons.

    python experiments/llm_speed.py --model smollm2-135m --out docs/results/llm_speed
    python experiments/llm_speed.py --model minilm-l6 --out docs/results/llm_speed

Loads ``ifjax.models.pretrained(model)``, prunes every MLP group at each ``--sparsities`` (l1, plain pruning: the
speed does not depend on the method), runs the model at its pruned shapes (:func:`ifjax.resize`, jitted) on
``--batch`` x ``--length`` random tokens, and reports the median of ``--repeats`` timed forward passes after a
warm-up, in tokens per second, and the ratio to the dense model timed in the same process. The load average is
recorded with each row: the 2 cores of this machine are shared, so absolute figures move with the load; the
ratio, measured back to back, moves less. Appends to ``--out/results.csv``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ifjax

import _report
from llm import target_groups

FIELDS = ("model", "mlp_sparsity", "params", "batch", "length", "seconds", "tokens_per_s", "speedup", "loadavg",
          "command")


def timed(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="minilm-l6", choices=["minilm-l6", "smollm2-135m"])
  parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  module, spec, variables = ifjax.models.pretrained(args.model)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, 20000, (args.batch, args.length)), jnp.int32)
  inputs = (ids,) if args.model.startswith("smollm2") else (ids, jnp.ones_like(ids))
  mlp = target_groups(spec)["mlp"]
  count = lambda v: sum(x.size for x in jax.tree_util.tree_leaves(v))
  dense_s = timed(jax.jit(module.apply), (variables, *inputs), args.repeats)
  command = "python " + " ".join(map(shlex.quote, sys.argv))
  tokens = args.batch * args.length
  rows = [dict(model=args.model, mlp_sparsity=0.0, params=count(variables["params"]), batch=args.batch,
               length=args.length, seconds=f"{dense_s:.3f}", tokens_per_s=f"{tokens / dense_s:.0f}", speedup="1.00",
               loadavg=f"{os.getloadavg()[0]:.1f}", command=command)]
  for s in args.sparsities:
    small = ifjax.apply_plan(variables, spec, ifjax.plan(variables, spec, {g: s for g in mlp}, method="default"))
    small_apply = jax.jit(ifjax.resize(module.apply, variables, small, *inputs))
    sec = timed(small_apply, (small, *inputs), args.repeats)
    rows.append(dict(model=args.model, mlp_sparsity=s, params=count(small["params"]), batch=args.batch,
                     length=args.length, seconds=f"{sec:.3f}", tokens_per_s=f"{tokens / sec:.0f}",
                     speedup=f"{dense_s / sec:.2f}", loadavg=f"{os.getloadavg()[0]:.1f}", command=command))
  for r in rows:
    print(r, flush=True)
  with _report.CsvAppender(args.out / "results.csv", FIELDS) as sink:
    sink.add(*rows)


if __name__ == "__main__":
  main()
