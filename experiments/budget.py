"""Whole-network compression to a FLOP budget on a pretrained CIFAR ResNet, data-free.

    python experiments/budget.py --model resnet56 --flops 0.52 --out docs/results/budget_resnet56

For each allocation (``uniform-internal``: one ratio for the block-internal groups, streams untouched, the
authors' setting; ``uniform``: one ratio for every group; ``global``: neurons of all groups ranked together
by normalised l1 importance; ``global-internal``: the same over the internal groups only) the per-group ratios come from :func:`ifjax.allocate` at the budget, then
default pruning and Intra-Fusion (paper and barycentric normalisation) are evaluated on the 10,000 JPEG
test images (``--limit`` for fewer). Writes ``results.csv`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ifjax
from ifjax import data

METHODS = {"default": dict(fuse=False), "if_paper": dict(normalization="paper"),
           "if_bary": dict(normalization="barycentric")}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="resnet56", help="resnet20 or resnet56 (pretrained weights in IFJAX_DATA)")
  ap.add_argument("--flops", type=float, default=0.52, help="fraction of the dense FLOPs to keep at most")
  ap.add_argument("--allocations", nargs="+", default=["uniform-internal", "uniform", "global", "global-internal"],
                  choices=["uniform-internal", "uniform", "global", "global-internal"])
  ap.add_argument("--limit", type=int, help="class-balanced subset of the test images")
  ap.add_argument("--out", type=pathlib.Path, required=True)
  args = ap.parse_args(argv)

  module, spec, variables = ifjax.models.pretrained(args.model)
  x, y = data.cifar10_jpeg("test", limit=args.limit)
  x = data.preprocess(args.model, x)
  example = jnp.ones((1, 32, 32, 3))
  rebuild = lambda w: ifjax.models.get(args.model, widths=w)[0].apply
  streams = [g.name for g in spec.groups if g.name.startswith("stream")]

  def accuracy(v, widths):
    small, _ = ifjax.models.get(args.model, widths=widths)
    predict = jax.jit(lambda v, xb: small.apply(v, xb, train=False).argmax(-1))
    return 100.0 * sum(int((np.asarray(predict(v, xb)) == yb).sum()) for xb, yb in data.batches(x, y, 500)) / len(y)

  rows = [dict(allocation="dense", method="-", flops=1.0, params=ifjax.param_count(variables),
               accuracy=accuracy(variables, {}), seconds=0.0)]
  print(f"{args.model} dense: {rows[0]['accuracy']:.2f}%")
  for name in args.allocations:
    t = time.perf_counter()
    alloc = ifjax.allocate(variables, spec, target_flops=args.flops, rebuild=rebuild, example_args=(example,),
                           example_kwargs=dict(train=False), method=name.split("-")[0],
                           protect=streams if name.endswith("-internal") else ())
    t_alloc = time.perf_counter() - t
    for meth, opts in METHODS.items():
      pl = ifjax.plan(variables, spec, alloc.ratios, **opts)
      v = ifjax.apply_plan(variables, spec, pl)
      w = ifjax.widths(variables, spec, pl)
      rows.append(dict(allocation=name, method=meth, flops=alloc.cost / alloc.dense_cost, params=ifjax.param_count(v),
                       accuracy=accuracy(v, w), seconds=t_alloc))
      print(f"{name:17s} {meth:9s} FLOPs {100 * rows[-1]['flops']:.1f}%  params {rows[-1]['params']:,}  "
            f"{rows[-1]['accuracy']:.2f}%", flush=True)

  args.out.mkdir(parents=True, exist_ok=True)
  with open(args.out / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  command = "python experiments/budget.py " + " ".join(sys.argv[1:] if argv is None else argv)
  lines = [f"`{command}` ({len(y)} test images, data-free)", "", "| allocation | method | FLOPs kept | params | accuracy |",
           "|---|---|---|---|---|"]
  lines += [f"| {r['allocation']} | {r['method']} | {100 * r['flops']:.1f}% | {r['params']:,} | {r['accuracy']:.2f} |"
            for r in rows]
  (args.out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
