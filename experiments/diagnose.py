"""Why Intra-Fusion loses to default pruning once BatchNorms are repaired: per-group measurements on real images.

For every block-internal group of a pretrained CIFAR ResNet (conv1 -> bn1 -> ReLU -> conv2 of each block), pruned
alone at ``--ratio``, on the dense network's own activations of ``--images`` CIFAR-10 test images (real images
are used for this diagnosis only; no method uses them):

* how similar the neurons that fusion merges are: the correlation of each pruned neuron's pre-activation with
  that of its OT target, the cosine of their folded weights (what a data-free method can see), and the best
  correlation any kept neuron offers;
* the variance of each fused channel against what the BN statistics predict for a single neuron
  (``(P @ sd)^2``, :func:`ifjax.unfold_batchnorm`'s estimate), without and with ``repair="statistics"``;
* what the next layer (conv2) sees: the relative error of its output against the dense one, raw and after the
  best per-channel affine correction (what re-estimating the next BN can fix at most), for default pruning,
  IF (paper / barycentric), IF with the statistics repair, Neuron Merging, Model Folding, and a least-squares
  compensation of the consumer fitted on the real activations (an oracle: the most any channel-wise linear
  compensation of the pruned neurons by the kept ones can recover).

    python experiments/diagnose.py --model resnet20 --out docs/results/diagnosis_resnet20
    python experiments/diagnose.py --model resnet56 --out docs/results/diagnosis_resnet56
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np

import ifjax
from ifjax import data
from ifjax._batchnorm import folded_flat, input_statistics
from ifjax._merging import unit_rows

import _report

METHODS = {"default": dict(method="default"), "if_paper": dict(), "if_bary": dict(normalization="barycentric"),
           "if_paper+repair": dict(repair="statistics"),
           "if_bary+repair": dict(normalization="barycentric", repair="statistics"),
           "neuron_merging": dict(method="neuron_merging"), "model_folding": dict(method="model_folding")}


def conv3x3(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """(N, H, W, C) activations, (3, 3, C, O) kernel -> (N, H, W, O), padding 1 (the blocks' conv2)."""
  return np.asarray(jax.lax.conv_general_dilated(a, kernel, (1, 1), ((1, 1), (1, 1)),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))


def affine_error(y: np.ndarray, yp: np.ndarray) -> float:
  """Relative error of ``yp`` against ``y`` (channels last) after the best per-channel scale and shift of yp."""
  y, yp = y.reshape(-1, y.shape[-1]), yp.reshape(-1, yp.shape[-1])
  yc, ypc = y - y.mean(0), yp - yp.mean(0)
  a = (ypc * yc).sum(0) / np.maximum((ypc ** 2).sum(0), 1e-12)
  return float(np.linalg.norm(yc - a * ypc) / np.linalg.norm(yc))


def least_squares_map(activations: np.ndarray, keep: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
  """(m, n) consumer map compensating the pruned channels by the kept ones: kept row j is 1 at ``keep[j]`` plus
  the regression coefficients of every pruned channel on the kept ones (``activations``: (samples, n))."""
  n = activations.shape[1]
  drop = np.setdiff1d(np.arange(n), keep)
  cov = np.cov(activations.T)
  ckk, ckp = cov[np.ix_(keep, keep)], cov[np.ix_(keep, drop)]
  coef = np.linalg.solve(ckk + ridge * np.trace(ckk) / len(keep) * np.eye(len(keep)), ckp)
  out = np.zeros((len(keep), n))
  out[np.arange(len(keep)), keep] = 1
  out[:, drop] = coef
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="resnet20", help="a pretrained CIFAR ResNet (resnet20, resnet56, ...)")
  ap.add_argument("--ratio", type=float, default=0.5, help="sparsity of each group, pruned alone")
  ap.add_argument("--images", type=int, default=200, help="CIFAR-10 test images (a multiple of 10)")
  ap.add_argument("--out", type=pathlib.Path)
  args = ap.parse_args(argv)

  module, spec, variables = ifjax.models.pretrained(args.model)
  x, _ = data.cifar10_jpeg("test", limit=args.images)
  _, state = module.apply(variables, data.preprocess(args.model, x), train=False, capture_intermediates=True,
                          mutable=["intermediates"])
  captured = state["intermediates"]
  flat, folded, stats = ifjax._spec.flatten(variables), folded_flat(variables, spec), input_statistics(variables, spec)
  inner = [g.name for g in spec.groups if "/" in g.name]
  plans = {k: ifjax.plan(variables, spec, args.ratio, groups=inner, **o) for k, o in METHODS.items()}

  rows = []
  for name in inner:
    block = name.split("/")[0]
    z = np.asarray(captured[block]["bn1"]["__call__"][0])  # (N, H, W, n) folded pre-activations
    n = z.shape[-1]
    kernel = np.asarray(flat[f"params/{block}/conv2/kernel"])  # (3, 3, n, out)
    y = conv3x3(np.maximum(z, 0), kernel)
    corr = np.corrcoef(z.reshape(-1, n).T)
    unit = unit_rows(np.asarray(folded[f"params/{block}/conv1/kernel"]).reshape(-1, n).T)
    sd = stats[f"batch_stats/{block}/bn1/var"]  # deviations (input_statistics)
    gp = plans["if_paper"][name]
    keep = np.asarray(gp.keep)
    pruned = np.setdiff1d(np.arange(n), keep)
    target = keep[np.asarray(gp.transport)[pruned].argmax(1)]
    row = {"group": name, "corr to OT target": np.mean(corr[pruned, target]),
           "weight cosine to OT target": np.mean(np.sum(unit[pruned] * unit[target], 1)),
           "best corr to a kept neuron": np.mean(np.max(corr[np.ix_(pruned, keep)], 1))}
    fused = np.asarray(gp.producer_map)  # the deviation predicted for one neuron: |P| @ sd (correlation 1)
    merged, predicted = (fused != 0).sum(1) > 1, np.abs(fused) @ sd
    for label, key in (("fused var / predicted", "if_paper"), ("repaired var / predicted", "if_paper+repair")):
      p, shift = np.asarray(plans[key][name].producer_map), plans[key][name].producer_shift
      zp = z @ p.T + (0 if shift is None else shift)
      row[label] = np.median(zp.reshape(-1, p.shape[0]).var(0)[merged] / predicted[merged] ** 2)
    maps = {k: pl[name] for k, pl in plans.items()}
    for k, g in maps.items():
      if g.producer_map is None:
        zp, consumer = z[..., keep], kernel[:, :, keep]
      else:
        zp = z @ np.asarray(g.producer_map).T + (0 if g.producer_shift is None else g.producer_shift)
        consumer = np.einsum("hwio,ji->hwjo", kernel, np.asarray(g.consumer_map))
      yp = conv3x3(np.maximum(zp, 0), consumer)
      row[f"{k} raw"] = float(np.linalg.norm(y - yp) / np.linalg.norm(y))
      row[f"{k} affine"] = affine_error(y, yp)
    a = np.maximum(z, 0)
    ls = least_squares_map(a.reshape(-1, n), keep)
    row["LS oracle affine"] = affine_error(y, conv3x3(a[..., keep], np.einsum("hwio,ji->hwjo", kernel, ls)))
    rows.append(row)

  keys = list(rows[0])
  mean = {"group": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in keys[1:]}}
  similarity = keys[:6]
  errors = ["group"] + [k for k in keys if k.endswith(" raw") or k.endswith(" affine")]
  header = (f"`python experiments/diagnose.py --model {args.model} --ratio {args.ratio} --images {args.images}` "
            f"(every internal group pruned alone at {args.ratio}; dense activations of {args.images} CIFAR-10 "
            "test images)")
  fmt = lambda r, ks: [r["group"], *(f"{r[k]:.3f}" for k in ks[1:])]
  text = "\n".join([header, "", "Similarity of merged neurons, and fused-channel variance:", "",
                    *_report.markdown_table(similarity, [fmt(r, similarity) for r in rows + [mean]]), "",
                    "What conv2 sees: relative error of its output (raw, and after the best per-channel affine "
                    "correction):", "", *_report.markdown_table(errors, [fmt(r, errors) for r in rows + [mean]])])
  print(text)
  if args.out:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    _report.write_csv(args.out / "results.csv", keys, rows + [mean])


if __name__ == "__main__":
  main()
