r"""The dense SmolLM2-135M as ifjax loads it: loading time, perplexity on Python documentation text, CPU speed.

    python experiments/smollm2_dense.py --seqs 32 --length 256

Loads ``ifjax.models.pretrained("smollm2-135m")`` (GGUF read, Q4_1 dequantized, spec traced) and its tokenizer,
joins CPython's ``pydoc_data.topics`` (topics in sorted order, blank lines between them), tokenizes it, cuts the
first ``--seqs`` windows of ``--length`` tokens and reports the perplexity of each window's tokens 2..length
given the ones before (no BOS token), and the jitted forward throughput in tokens/s.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import ifjax


def main():
  parser = argparse.ArgumentParser(description="The dense SmolLM2-135M: loading time, perplexity, CPU speed.")
  parser.add_argument("--seqs", type=int, default=32)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--batch", type=int, default=4)
  args = parser.parse_args()

  t = time.perf_counter()
  module, spec, variables = ifjax.models.pretrained("smollm2-135m")
  load_s = time.perf_counter() - t
  tok = ifjax.models.tokenizer("smollm2-135m")
  print(f"loaded in {load_s:.1f} s (read, dequantize, trace): {len(spec.groups)} groups, "
        f"{ifjax.param_count(variables) / 1e6:.1f}M parameters")

  from pydoc_data.topics import topics
  ids = np.array(tok.encode("\n\n".join(topics[k] for k in sorted(topics))).ids, np.int32)
  need = args.seqs * args.length
  if len(ids) < need:
    raise SystemExit(f"only {len(ids)} tokens of text, {need} needed")
  windows = ids[:need].reshape(args.seqs, args.length)

  @jax.jit
  def nll(v, x):
    logp = jax.nn.log_softmax(module.apply(v, x)[:, :-1], -1)
    return -jnp.take_along_axis(logp, x[:, 1:, None], -1)[..., 0].sum()

  nll(variables, jnp.asarray(windows[:args.batch])).block_until_ready()  # compile
  total, t = 0.0, time.perf_counter()
  for i in range(0, args.seqs, args.batch):
    total += float(nll(variables, jnp.asarray(windows[i:i + args.batch])))
  seconds = time.perf_counter() - t
  ppl = float(np.exp(total / (args.seqs * (args.length - 1))))
  print(f"perplexity {ppl:.3f} on {args.seqs} windows of {args.length} tokens of pydoc_data.topics "
        f"({windows.size / seconds:.0f} tokens/s, batch {args.batch}, {jax.devices()[0].platform})")


if __name__ == "__main__":
  main()
