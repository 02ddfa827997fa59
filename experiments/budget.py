r"""Whole-network compression to FLOP budgets on a pretrained network: accuracy against FLOPs kept.

    python experiments/budget.py --model resnet56 --flops 0.52 --out docs/results/budget_resnet56
    python experiments/budget.py --model resnet20 --flops 0.3 0.4 0.52 0.6 0.7 --allocations uniform-internal \
        sensitivity-internal --steps 1 4 --modes free light --limit 1000 --plot --out docs/results/budget_resnet20

For every budget and allocation the per-group ratios come from :func:`ifjax.allocate`:
``uniform-internal`` (one ratio for the block-internal groups, streams and stems untouched: the authors'
setting), ``uniform`` (one ratio for every group), ``global`` / ``global-internal`` (neurons ranked together by
normalised l1 importance), ``sensitivity`` / ``sensitivity-internal`` (data-free BN-statistics sensitivity per
FLOP, :func:`ifjax.bn_sensitivity`), ``measured`` / ``measured-internal`` (every group pruned alone at a few
ratios with ``--measure-method``, BNs re-estimated on the probe inputs unless ``--measure-free``, and the KL
divergence of its predictions on those inputs measured, :func:`ifjax.measure_sensitivity`; the probe inputs are
the synthetic ones, data-free, or with ``--measure-on calib`` the ``--calib`` images, which makes the
allocation data-light and allows ``--modes light`` only; curves cached in ``--out`` as ``curves_<...>.json``).
"Internal" groups are the ones named ``block/layer``. Then, at that
allocation, default pruning and Intra-Fusion (paper / barycentric normalisation) run in one shot
(``--steps 1``) or in k steps re-planned on the fused weights (:func:`ifjax.iterative_fuse`).

Modes: ``free`` (data-free: nothing but the weights), ``synthetic`` (still data-free: BN statistics
re-estimated with :func:`ifjax.recalibrate_batchnorm` on ``--synthetic`` inputs that
:func:`ifjax.synthesize_inputs` makes from the dense network's own BN statistics, no image involved; cached in
``--out`` as ``synthetic_<count>x<steps>.npy``) and ``light`` (the same re-estimation on ``--calib`` unlabelled
training images; CIFAR: the first images of the class-balanced training subset; EfficientNet-Lite0: ImageNet
sample images 500.. that are not evaluated). ``synthetic`` and ``light`` need the one-shot plan, so they are run
for ``--steps 1`` only.

Evaluation: CIFAR-10 JPEG test images (``--limit``: a class-balanced subset), or for EfficientNet-Lite0 top-1
on the first ``--limit`` ImageNet sample images (one per class). Writes ``results.csv``, ``results.md`` (with
the win rate of IF over default at equal allocation) and, with ``--plot``, ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
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
ALLOCATIONS = ["uniform-internal", "uniform", "global", "global-internal", "sensitivity", "sensitivity-internal",
               "measured", "measured-internal"]
MODES = ["free", "synthetic", "light"]
MODE_TITLES = {"free": "data-free", "synthetic": "data-free, synthetic BN", "light": "data-light"}
FIELDS = ["model", "target", "allocation", "method", "steps", "mode", "flops", "params", "accuracy", "seconds"]


def load_sets(model: str, limit: int | None, calib: int):
  """(test images, labels, calibration batches) preprocessed for ``model``."""
  if model == "efficientnet_lite0":
    x, y = data.imagenet_sample()
    n = limit or 500
    if n > 500:
      raise ValueError("efficientnet_lite0: --limit at most 500 (images 500.. are the calibration set)")
    xc = x[500:500 + calib]
    x, y = x[:n], y[:n]
  else:
    x, y = data.cifar10_jpeg("test", limit=limit)
    xc, _ = data.cifar10_jpeg("train", limit=max(calib, 10))
    xc = xc[:calib]
  xc = data.preprocess(model, xc)
  return data.preprocess(model, x), y, [xc[i:i + 250] for i in range(0, len(xc), 250)]


def internal(spec) -> list[str]:
  return [g.name for g in spec.groups if "/" in g.name]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="resnet56", help="resnet20, resnet56 or efficientnet_lite0 (pretrained weights)")
  ap.add_argument("--flops", type=float, nargs="+", default=[0.52], help="fractions of the dense FLOPs to keep at most")
  ap.add_argument("--allocations", nargs="+", default=["uniform-internal", "uniform", "global", "global-internal"],
                  choices=ALLOCATIONS)
  ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  ap.add_argument("--steps", type=int, nargs="+", default=[1], help="1: one shot; k > 1: iterative_fuse in k steps")
  ap.add_argument("--modes", nargs="+", default=["free"], choices=MODES)
  ap.add_argument("--synthetic", type=int, default=256, help="synthetic inputs for --modes synthetic")
  ap.add_argument("--synthetic-steps", type=int, default=200, help="Adam steps per batch of synthetic inputs")
  ap.add_argument("--measure-method", choices=list(METHODS), default="default",
                  help="how the measured allocations prune each probe")
  ap.add_argument("--measure-on", choices=("synthetic", "calib"), default="synthetic",
                  help="probe inputs of the measured allocations: the synthetic inputs (data-free) or the --calib "
                  "images (data-light: --modes light only)")
  ap.add_argument("--measure-free", action="store_true",
                  help="measured allocations: probe without re-estimating BNs (for a weights-only network)")
  ap.add_argument("--calib", type=int, default=500, help="unlabelled images for the BN re-estimation of --modes light")
  ap.add_argument("--limit", type=int, help="evaluate on this many test images (class-balanced for CIFAR)")
  ap.add_argument("--batch-size", type=int, default=500)
  ap.add_argument("--plot", action="store_true", help="also write accuracy.png (accuracy against FLOPs kept)")
  ap.add_argument("--summarize", action="store_true",
                  help="only rewrite results.md (and accuracy.png with --plot) from the results.csv in --out")
  ap.add_argument("--out", type=pathlib.Path, required=True)
  args = ap.parse_args(argv)
  if args.summarize:
    text = ("model", "allocation", "method", "mode")
    rows = [{k: v if k in text else int(v) if k in ("steps", "params") else float(v) for k, v in r.items()}
            for r in csv.DictReader(open(args.out / "results.csv"))]
    first = (args.out / "results.md").read_text().splitlines()[0]
    write(rows, args, 0, None, header=first)
    if args.plot:
      plot(rows, args.out / "accuracy.png")
    return

  measuring = any(a.startswith("measured") for a in args.allocations)
  if measuring and args.measure_on == "calib" and args.modes != ["light"]:
    ap.error("--measure-on calib makes the allocation data-light: use --modes light")
  module, spec, variables = ifjax.models.pretrained(args.model)
  x, y, calib = load_sets(args.model, args.limit, args.calib if "light" in args.modes else 0)
  example = jnp.ones((1, *x.shape[1:]))
  rebuild = lambda w: ifjax.models.get(args.model, num_classes=module.num_classes, widths=w)[0].apply
  build_spec = lambda w: ifjax.models.get(args.model, num_classes=module.num_classes, widths=w)[1]
  dense_widths = spec.validate(variables)
  inner = internal(spec)
  predictors = {}

  def train_apply(widths):  # EfficientNet's head dropout (after every BN) needs a key in train mode
    apply = rebuild(widths)
    return lambda v, xb, **kw: apply(v, xb, rngs={"dropout": jax.random.key(0)}, **kw)

  def accuracy(v, widths):
    key = tuple(sorted(widths.items()))
    if key not in predictors:
      small, _ = ifjax.models.get(args.model, num_classes=module.num_classes, widths=widths)
      predictors[key] = jax.jit(lambda v, xb: small.apply(v, xb, train=False).argmax(-1))
    hits = sum(int((np.asarray(predictors[key](v, xb)) == yb).sum()) for xb, yb in data.batches(x, y, args.batch_size))
    return 100.0 * hits / len(y)

  args.out.mkdir(parents=True, exist_ok=True)
  batches = {"light": calib}
  if "synthetic" in args.modes or (measuring and args.measure_on == "synthetic"):
    batches["synthetic"] = synthetic_batches(train_apply(dense_widths), variables, x.shape[1:], args)
  rows = [dict(model=args.model, target=1.0, allocation="dense", method="-", steps=0, mode="-", flops=1.0,
               params=ifjax.param_count(variables), accuracy=accuracy(variables, dense_widths), seconds=0.0)]
  print(f"{args.model} dense: {rows[0]['accuracy']:.2f}% on {len(y)} images", flush=True)
  for target in args.flops:
    for name in args.allocations:
      t = time.perf_counter()
      groups = inner if name.endswith("-internal") else None
      curves = measured_curves(train_apply(dense_widths), variables, spec,
                               batches["synthetic" if args.measure_on == "synthetic" else "light"], groups, args) \
          if name.startswith("measured") else None
      alloc = ifjax.allocate(variables, spec, target_flops=target, rebuild=rebuild, example_args=(example,),
                             example_kwargs=dict(train=False), method=name.split("-")[0], groups=groups,
                             curves=curves)
      t_alloc = time.perf_counter() - t
      widths = {**dense_widths, **alloc.kept}
      print(f"{target} {name}: FLOPs {100 * alloc.cost / alloc.dense_cost:.1f}% ({t_alloc:.0f} s) kept {alloc.kept}",
            flush=True)
      for meth in args.methods:
        for steps in args.steps:
          t = time.perf_counter()
          if steps == 1:
            pl = ifjax.plan(variables, spec, alloc.ratios, **METHODS[meth])
            v = ifjax.apply_plan(variables, spec, pl)
          else:
            v = ifjax.iterative_fuse(variables, build_spec, alloc.ratios, steps=steps, **METHODS[meth])
          t_fuse = time.perf_counter() - t
          for mode in [m for m in MODES if m in args.modes] if steps == 1 else ["free"]:
            t = time.perf_counter()
            vm = v if mode == "free" else \
                ifjax.recalibrate_batchnorm(train_apply(widths), v, variables, spec, pl, batches[mode])
            rows.append(dict(model=args.model, target=target, allocation=name, method=meth, steps=steps, mode=mode,
                             flops=alloc.cost / alloc.dense_cost, params=ifjax.param_count(vm),
                             accuracy=accuracy(vm, widths), seconds=t_alloc + t_fuse + time.perf_counter() - t))
            print(f"  {meth:9s} steps {steps} {mode:5s} params {rows[-1]['params']:,}  {rows[-1]['accuracy']:.2f}%",
                  flush=True)
      write(rows, args, len(y), argv)
  write(rows, args, len(y), argv)
  if args.plot:
    plot(rows, args.out / "accuracy.png")


def synthetic_batches(apply_fn, variables, input_shape, args) -> list[np.ndarray]:
  """``--synthetic`` inputs made from the dense network's BN statistics (cached in ``--out``), in batches of 128."""
  path = args.out / f"synthetic_{args.synthetic}x{args.synthetic_steps}.npy"
  if path.exists():
    inputs = np.load(path)
  else:
    t = time.perf_counter()
    made = ifjax.synthesize_inputs(apply_fn, variables, tuple(input_shape), count=args.synthetic,
                                   steps=args.synthetic_steps)
    inputs = made.inputs
    np.save(path, inputs)
    print(f"synthetic inputs: {len(inputs)} in {time.perf_counter() - t:.0f} s, BN-statistics gap "
          f"{made.losses[:, 0].mean():.3f} -> {made.losses[:, -1].mean():.3f}", flush=True)
  return [inputs[i:i + 128] for i in range(0, len(inputs), 128)]


def measured_curves(apply_fn, variables, spec, batches, groups, args) -> ifjax.SensitivityCurves:
  """:func:`ifjax.measure_sensitivity` on ``batches`` (``--measure-on``) for ``--measure-method``, cached in
  ``--out``."""
  recalibrate = not args.measure_free
  source = f"{args.synthetic}x{args.synthetic_steps}" if args.measure_on == "synthetic" else f"calib{args.calib}"
  path = args.out / (f"curves_{args.measure_method}_{'recal' if recalibrate else 'free'}_"
                     f"{'internal' if groups else 'all'}_{source}.json")
  if path.exists():
    saved = json.loads(path.read_text())
    return ifjax.SensitivityCurves(np.asarray(saved["ratios"]), {g: np.asarray(k) for g, k in saved["kept"].items()},
                                   saved["size"], {g: np.asarray(v) for g, v in saved["loss"].items()})
  t = time.perf_counter()
  curves = ifjax.measure_sensitivity(apply_fn, variables, spec, np.concatenate(batches), groups=groups,
                                     recalibrate=recalibrate, **METHODS[args.measure_method])
  print(f"measured sensitivity of {len(curves.size)} groups in {time.perf_counter() - t:.0f} s", flush=True)
  path.write_text(json.dumps(dict(ratios=curves.ratios.tolist(), size=curves.size,
                                  kept={g: k.tolist() for g, k in curves.kept.items()},
                                  loss={g: v.tolist() for g, v in curves.loss.items()}), indent=1))
  return curves


def win_rates(rows: list[dict]) -> list[str]:
  """IF over default at equal allocation (same budget, allocation, steps): wins / cells per normalisation and mode."""
  cells = {}
  for r in rows[1:]:
    cells.setdefault((r["target"], r["allocation"], r["steps"], r["mode"]), {})[r["method"]] = r["accuracy"]
  out = []
  for meth in ("if_paper", "if_bary"):
    for mode in MODES:
      pairs = [(c[meth], c["default"]) for k, c in cells.items() if k[3] == mode and meth in c and "default" in c]
      if pairs:
        wins = sum(a > b for a, b in pairs)
        out.append(f"- {meth}, {MODE_TITLES[mode]}: beats default in {wins} of {len(pairs)} cells "
                   f"({100 * wins / len(pairs):.0f}%); "
                   f"mean difference {np.mean([a - b for a, b in pairs]):+.2f} points")
  return out


def write(rows: list[dict], args, n_images: int, argv, header: str | None = None):
  with open(args.out / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  command = "python experiments/budget.py " + " ".join(sys.argv[1:] if argv is None else argv)
  lines = [header or f"`{command}` ({n_images} test images)", "",
           "| allocation | method | steps | mode | budget | FLOPs kept | params | accuracy |",
           "|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r['allocation']} | {r['method']} | {r['steps']} | {r['mode']} | {100 * r['target']:.0f}% | "
            f"{100 * r['flops']:.1f}% | {r['params']:,} | {r['accuracy']:.2f} |" for r in rows]
  lines += ["", "Win rate of IF over default at equal allocation (same budget, allocation, steps and mode; after a "
            "BN reset, synthetic or data-light, the two normalisations give the same network):", ""]
  lines += win_rates(rows)
  (args.out / "results.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: pathlib.Path):
  """One panel per (mode, allocation): accuracy against FLOPs kept, a line per method (dashed: iterative)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  dense = rows[0]["accuracy"]
  panels = sorted({(r["mode"], r["allocation"]) for r in rows[1:]}, key=lambda p: (MODES.index(p[0]), p[1]))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 2.8), sharey=True, squeeze=False)
  colors = {"default": "tab:gray", "if_paper": "tab:blue", "if_bary": "tab:orange"}
  for ax, (mode, alloc) in zip(axes.flat, panels):
    for meth in colors:
      for steps in sorted({r["steps"] for r in rows[1:]}):
        pts = sorted((r["flops"], r["accuracy"]) for r in rows[1:] if (r["mode"], r["allocation"], r["method"],
                                                                        r["steps"]) == (mode, alloc, meth, steps))
        if pts:
          ax.plot(*zip(*pts), marker="o", ms=3, color=colors[meth], ls="-" if steps == 1 else "--",
                  label=meth + ("" if steps == 1 else f" ({steps} steps)"))
    ax.axhline(dense, color="k", lw=0.6, ls=":")
    ax.set_title(f"{alloc}, {MODE_TITLES[mode]}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("FLOPs kept", fontsize=7)
  axes.flat[0].set_ylabel(f"accuracy (%) ({rows[0]['model']})", fontsize=7)
  axes.flat[0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
