"""Loading time and jitted CPU throughput of all-MiniLM-L6-v2 in ifjax's Flax BERT, dense and resized.

  python experiments/minilm_speed.py [--batch 32] [--length 128] [--repeats 10] [--mlp 0.5]

Prints the time of ``ifjax.models.pretrained("minilm-l6")`` (read safetensors + trace the spec; imports excluded),
then sentences/s and tokens/s of the jitted dense model on ``batch`` sentences of ``length`` tokens (Python
documentation sentences, padded or truncated to ``length``), and of the model with ``--mlp`` of every layer's MLP
neurons pruned, run at its smaller shapes by ``ifjax.resize``. Best of ``repeats`` timed calls, after a warm-up.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np


def _best(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--length", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--mlp", type=float, default=0.5, help="fraction of MLP neurons pruned in the resized model")
  args = ap.parse_args(argv)


  import ifjax

  t = time.perf_counter()
  module, spec, variables = ifjax.models.pretrained("minilm-l6")
  print(f"pretrained('minilm-l6'): {time.perf_counter() - t:.2f} s (safetensors + config + traced spec)")
  tok = ifjax.models.tokenizer("minilm-l6")
  tok.enable_padding(pad_id=0, pad_token="[PAD]", length=args.length)
  tok.enable_truncation(max_length=args.length)
  text = " ".join(ifjax.data.python_docs_sentences("evaluation"))
  words = text.split()
  chunk = max(1, len(words) // args.batch)
  enc = tok.encode_batch([" ".join(words[i * chunk:(i + 1) * chunk]) for i in range(args.batch)])
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], np.int32)
  tokens = int(mask.sum())

  dense = jax.jit(module.apply)
  rows = [("dense", ifjax.param_count(variables), _best(lambda: dense(variables, ids, mask), args.repeats))]
  mlp = [g.name for g in spec.groups if g.name.endswith("/mlp/fc1")]
  small = ifjax.prune(variables, spec, args.mlp, groups=mlp)
  run = jax.jit(ifjax.resize(module.apply, variables, small, ids, mask))
  rows.append((f"MLP -{args.mlp:.0%} (resize)", ifjax.param_count(small),
               _best(lambda: run(small, ids, mask), args.repeats)))
  print(f"batch {args.batch} x length {args.length} ({tokens} real tokens), {jax.devices()[0].platform}, "
        f"best of {args.repeats}:")
  for name, params, s in rows:
    print(f"  {name}: {params / 1e6:.2f}M params, {s * 1e3:.1f} ms, {args.batch / s:.0f} sentences/s, "
          f"{args.batch * args.length / s:.0f} tokens/s; x{rows[0][2] / s:.2f} dense")


if __name__ == "__main__":
  main()
