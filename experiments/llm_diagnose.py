r"""Why data-free fusion loses on MiniLM's MLPs: each layer's MLP block, alone, on real inputs.

    python experiments/llm_diagnose.py --out docs/results/llm_diagnosis

For each of all-MiniLM-L6-v2's 6 MLP blocks (``fc1`` → GELU → ``fc2``), on the inputs the dense model feeds it
(calibration sentences), at ``--sparsity``:

* the block's relative output error ``||f_small(x) - f(x)|| / ||f(x) - mean f||`` for each method;
* for Intra-Fusion (``paper`` maps, l1 importance, the weight-space cost), how alike the neurons it merges are:
  the cosine of their weight vectors (the OT features) and the correlation of their activations, for each
  pruned neuron and the kept neuron that takes most of it;
* the GELU gap: how far the fused neuron's activation ``gelu(sum of pre-activations)`` is from the sum of the
  sources' activations, which is what the consumer's summed columns assume (relative to the activations' size).

Writes ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

import flax.linen as nn
import jax
import numpy as np

import ifjax
from ifjax import calibration, data

import _report
import llm

# label -> experiments/llm.py's method
METHODS = {
    "default": "default",
    "if_paper": "if_paper",
    "if_bary": "if_bary",
    "act (wanda)": "act",
    "act + IF act-cost": "act_if",
    "act + LS refit": "act_ls",
}


def block_inputs(module, variables, ids, mask, layers):
  """``{layer: (positions, 384)}``: the inputs of each layer's fc1 on the unpadded tokens."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if context.method_name == "__call__" and len(path) == 3 and path[1:] == ("mlp", "fc1"):
      seen[path[0]] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    module.apply(variables, ids, mask)
  keep = np.asarray(mask).reshape(-1).astype(bool)
  return {name: seen[name].reshape(-1, seen[name].shape[-1])[keep] for name in layers}


def mlp(p, x):
  h = np.asarray(jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False))
  return h, h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sparsity", type=float, default=0.25)
  parser.add_argument("--sentences", type=int, default=128)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  module, spec, variables = ifjax.models.pretrained("minilm-l6")
  tok = ifjax.models.tokenizer("minilm-l6")
  enc = tok.encode_batch(data.python_docs_sentences("calibration")[:args.sentences])
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], np.int32)
  groups = [g.name for g in spec.groups if g.name.endswith("/mlp/fc1")]
  layers = [g.split("/")[0] for g in groups]
  inputs = block_inputs(module, variables, ids, mask, layers)
  stats = calibration.consumer_statistics(module.apply, variables, ifjax.Spec([spec[g] for g in groups]),
                                          [(ids, mask)], gram=True)
  ratio = {g: args.sparsity for g in groups}
  small = {label: llm.prune(method, module, spec, variables, ratio, stats, [(ids, mask)])
           for label, method in METHODS.items()}

  rows, report = [], {"command": "python " + " ".join(map(shlex.quote, sys.argv)), "layers": {}}
  for g, layer in zip(groups, layers):
    x = inputs[layer]
    dense_h, dense_y = mlp(variables["params"][layer]["mlp"], x)
    scale = np.linalg.norm(dense_y - dense_y.mean(0))
    errors = {}
    for label, (_, sv) in small.items():
      errors[label] = float(np.linalg.norm(mlp(sv["params"][layer]["mlp"], x)[1] - dense_y) / scale)
    gp = small["if_paper"][0][g]
    t = np.asarray(gp.transport)
    keep = np.asarray(gp.keep)
    pruned = np.setdiff1d(np.arange(gp.n), keep)
    target = keep[np.argmax(t[pruned], axis=1)]
    p = variables["params"][layer]["mlp"]
    vec = np.concatenate([p["fc1"]["kernel"].T, p["fc2"]["kernel"]], axis=1)
    unit = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    cos = float(np.mean(np.sum(unit[pruned] * unit[target], 1)))
    hc = (dense_h - dense_h.mean(0)) / (dense_h.std(0) + 1e-12)
    corr = float(np.mean(np.mean(hc[:, pruned] * hc[:, target], 0)))
    pre = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    fused_act = np.asarray(jax.nn.gelu(pre[:, pruned] + pre[:, target], approximate=False))
    summed = dense_h[:, pruned] + dense_h[:, target]
    gap = float(np.linalg.norm(fused_act - summed) / np.linalg.norm(summed))
    report["layers"][layer] = dict(errors=errors, merged_weight_cosine=cos, merged_activation_correlation=corr,
                                   gelu_gap=gap)
    rows.append([layer, *[f"{errors[k]:.3f}" for k in METHODS], f"{cos:.3f}", f"{corr:.3f}", f"{gap:.3f}"])
  mean = lambda key: np.mean([v[key] for v in report["layers"].values()])
  rows.append(["mean", *[f"{np.mean([v['errors'][k] for v in report['layers'].values()]):.3f}" for k in METHODS],
               f"{mean('merged_weight_cosine'):.3f}", f"{mean('merged_activation_correlation'):.3f}",
               f"{mean('gelu_gap'):.3f}"])
  lines = [f"# MiniLM-L6: each MLP block alone at sparsity {args.sparsity}", "", f"Command: `{report['command']}`",
           "", f"Inputs: the dense model's, on {args.sentences} calibration sentences ({len(x)} tokens). Errors: "
           "relative to the block output's spread. The last three columns are about the merges `if_paper` makes.",
           ""]
  lines += _report.markdown_table(["layer", *[f"error {k}" for k in METHODS], "merged cos (weights)",
                                   "merged corr (activations)", "GELU gap"], rows)
  (args.out / "results.md").write_text("\n".join(lines) + "\n")
  (args.out / "results.json").write_text(json.dumps(report, indent=1))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
