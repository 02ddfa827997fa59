r"""Whole-network compression with :func:`ifjax.compress`: methods x recipes at one FLOP budget, with their cost.

    python experiments/compress.py --model resnet20 --flops 0.52 --out docs/results/compress_resnet20
    python experiments/compress.py --model resnet56 --flops 0.52 --curves \
        docs/results/budget_resnet56_measured_10k/curves_default_recal_internal_256x200.json \
        --out docs/results/compress_resnet56

Every method prunes at the same allocation: measured on the synthetic inputs (each internal group pruned alone
with default pruning, BNs re-estimated, the KL of the predictions; ``--curves`` reuses saved curves), except
``tp_global_l1`` (Torch-Pruning's global L1 ranking, its own allocation). Recipes, from data-free to labelled:

* ``weights``: the weights as the method leaves them (no data, nothing synthesized);
* ``bn``: + BN statistics re-estimated on ``--synthetic`` inputs made from the dense BN statistics (no image);
* ``distill``: + ``--distill-steps`` of distillation toward the dense network on those synthetic inputs;
* ``unlabelled``: BNs and distillation on ``--unlabelled`` real training images instead (no labels);
* ``finetune<E>``: BNs on the unlabelled images, then E epochs of labelled fine-tuning on ``--train-images``.

Each cell is one :func:`ifjax.compress` call; its wall time (this machine), images and steps are recorded beside
the accuracy on ``--limit`` CIFAR-10 test images. Cells already in ``--out/results.csv`` are skipped (resumable).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

import jax
import numpy as np

import ifjax
from ifjax import data

import _report

METHODS = {
    "default": dict(method="default"),
    "if_paper": dict(),
    "if_bary": dict(normalization="barycentric"),
    "if_bary_repair": dict(normalization="barycentric", repair="statistics"),
    "if_bary_thr0.1": dict(normalization="barycentric", merge_threshold=0.1),
    "if_bary_thr0.2": dict(normalization="barycentric", merge_threshold=0.2),
    "if_bary_thr0.3": dict(normalization="barycentric", merge_threshold=0.3),
    "if_paper_thr0.2": dict(merge_threshold=0.2),
    "if_bary_thr0.2_repair": dict(normalization="barycentric", merge_threshold=0.2, repair="statistics"),
    "neuron_merging": dict(method="neuron_merging"),
    "model_folding": dict(method="model_folding"),
    "tp_global_l1": dict(method="default"),  # with allocation="global"
}
FUSION = [m for m in METHODS if m not in ("default", "tp_global_l1")]
FIELDS = ["model", "flops_target", "method", "recipe", "accuracy", "flops_kept", "params", "seconds",
          "synthetic_images", "real_images", "distill_steps", "finetune_epochs", "test_images"]


def load_curves(path: pathlib.Path) -> ifjax.SensitivityCurves:
  saved = json.loads(path.read_text())
  return ifjax.SensitivityCurves(np.asarray(saved["ratios"]), {g: np.asarray(k) for g, k in saved["kept"].items()},
                                 saved["size"], {g: np.asarray(v) for g, v in saved["loss"].items()})


def save_curves(curves: ifjax.SensitivityCurves, path: pathlib.Path) -> None:
  path.write_text(json.dumps(dict(ratios=curves.ratios.tolist(), size=curves.size,
                                  kept={g: k.tolist() for g, k in curves.kept.items()},
                                  loss={g: v.tolist() for g, v in curves.loss.items()}), indent=1))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="resnet20")
  ap.add_argument("--flops", type=float, default=0.52, help="fraction of the dense FLOPs to keep at most")
  ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  ap.add_argument("--recipes", nargs="+", default=["weights", "bn", "distill", "unlabelled"])
  ap.add_argument("--synthetic", type=int, default=256)
  ap.add_argument("--synthetic-steps", type=int, default=200)
  ap.add_argument("--distill-steps", type=int, default=500)
  ap.add_argument("--unlabelled", type=int, default=500, help="real training images without labels")
  ap.add_argument("--train-images", type=int, default=10000, help="labelled training images for finetune<E>")
  ap.add_argument("--curves", type=pathlib.Path, help="saved SensitivityCurves (JSON) for the measured allocation")
  ap.add_argument("--limit", type=int, help="test images (class-balanced); default all 10,000")
  ap.add_argument("--summarize", action="store_true", help="only rewrite results.md from --out/results.csv")
  ap.add_argument("--out", type=pathlib.Path, required=True)
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  if args.summarize:
    write_markdown(_report.read_csv(args.out / "results.csv"), args)
    return
  with open(args.out / "commands.txt", "a") as f:  # every run that added cells, for results.md
    f.write(shlex.join(["python", "experiments/compress.py", *argv]) + "\n")

  module, spec, variables = ifjax.models.pretrained(args.model)
  x, y = data.cifar10_jpeg("test", limit=args.limit)
  x = data.preprocess(args.model, x)
  internal = [g.name for g in spec.groups if "/" in g.name]
  dense_flops = ifjax.flops(module.apply, variables, x[:1], train=False)

  def accuracy(module_small, v):
    predict = jax.jit(lambda v, xb: module_small.apply(v, xb, train=False).argmax(-1))
    hits = sum(int((np.asarray(predict(v, xb)) == yb).sum()) for xb, yb in data.batches(x, y, 500))
    return 100.0 * hits / len(y)

  # the data-free calibration inputs and the measured allocation, shared by every cell (cached in --out)
  synthetic_path = args.out / f"synthetic_{args.synthetic}x{args.synthetic_steps}.npy"
  if synthetic_path.exists():
    synthetic = ifjax.SyntheticInputs(np.load(synthetic_path), np.zeros((0, 0)))
    synth_seconds = json.loads((args.out / "synthetic_seconds.json").read_text())["seconds"]
  else:
    t0 = time.perf_counter()
    train_apply = lambda v, xb, **kw: module.apply(v, xb, **kw)
    synthetic = ifjax.synthesize_inputs(train_apply, variables, x.shape[1:], count=args.synthetic,
                                        steps=args.synthetic_steps)
    synth_seconds = time.perf_counter() - t0
    np.save(synthetic_path, np.asarray(synthetic.inputs))
    (args.out / "synthetic_seconds.json").write_text(json.dumps({"seconds": synth_seconds}))
  curves_path = args.curves or args.out / f"curves_default_recal_internal_{args.synthetic}x{args.synthetic_steps}.json"
  if curves_path.exists():
    curves = load_curves(curves_path)
  else:
    curves = ifjax.measure_sensitivity(module.apply, variables, spec, np.asarray(synthetic.inputs), groups=internal,
                                       method="default")
    save_curves(curves, curves_path)
  unlabelled = None
  if any(r == "unlabelled" or r.startswith("finetune") for r in args.recipes):
    unlabelled = data.preprocess(args.model, data.cifar10_jpeg("train", limit=max(10, args.unlabelled))[0])

  path = args.out / "results.csv"
  rows = _report.read_csv(path) if path.exists() else []
  done = {(r["method"], r["recipe"]) for r in rows}
  if not any(r["method"] == "dense" for r in rows):
    rows.append({"model": args.model, "flops_target": args.flops, "method": "dense", "recipe": "-",
                 "accuracy": accuracy(module, variables), "flops_kept": 1.0, "params": ifjax.param_count(variables),
                 "seconds": 0, "synthetic_images": 0, "real_images": 0, "distill_steps": 0, "finetune_epochs": 0,
                 "test_images": len(y)})
    _report.write_csv(path, FIELDS, rows)
  for recipe in args.recipes:
    for method in args.methods:
      if (method, recipe) in done:
        continue
      kw = dict(target_flops=args.flops, groups=internal, plan_options=METHODS[method],
                allocation="global" if method == "tp_global_l1" else "measured", curves=curves, progress=False)
      if recipe == "weights":
        kw.update(data=synthetic, repair=False)
      elif recipe == "bn":
        kw.update(data=synthetic)
      elif recipe == "distill":
        kw.update(data=synthetic, distill_steps=args.distill_steps)
      elif recipe == "unlabelled":
        kw.update(data=unlabelled, calibration=args.unlabelled, distill_steps=args.distill_steps)
      elif recipe.startswith("finetune"):
        train_x, train_y = data.cifar10_jpeg("train", limit=args.train_images)
        kw.update(data=(data.preprocess(args.model, train_x), train_y), calibration=args.unlabelled,
                  finetune_epochs=int(recipe[len("finetune"):]))
      else:
        raise SystemExit(f"unknown recipe {recipe!r}")
      result = ifjax.compress(args.model, variables, spec, **kw)
      report = result.report
      seconds = report["seconds"] + (synth_seconds if recipe in ("bn", "distill") else 0.0)
      flops_kept = ifjax.flops(result.module.apply, result.variables, x[:1], train=False) / dense_flops
      row = {"model": args.model, "flops_target": args.flops, "method": method, "recipe": recipe,
             "accuracy": accuracy(result.module, result.variables), "flops_kept": flops_kept,
             "params": ifjax.param_count(result.variables), "seconds": seconds,
             "synthetic_images": len(synthetic.inputs) if recipe in ("bn", "distill") else 0,
             "real_images": report["real_images"], "distill_steps": report["distill_steps"],
             "finetune_epochs": report["finetune_epochs"], "test_images": len(y)}
      rows.append(row)
      _report.write_csv(path, FIELDS, rows)
      print(f"{method:15s} {recipe:10s} {row['accuracy']:6.2f}%  FLOPs {100 * flops_kept:.1f}%  "
            f"{seconds:7.1f} s", flush=True)
  write_markdown(rows, args)


def write_markdown(rows: list[dict], args) -> None:
  dense = next(r for r in rows if r["method"] == "dense")
  rows = [r for r in rows if r["method"] != "dense"]
  recipes = list(dict.fromkeys(r["recipe"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  cell = {(r["method"], r["recipe"]): r for r in rows}
  fmt = lambda r: f"{float(r['accuracy']):.2f}" if r else "-"
  body = [[m, *(fmt(cell.get((m, rc))) for rc in recipes)] for m in methods]
  cost = [[rc, *(f"{float(cell[(m, rc)]['seconds']):.0f} s" if (m, rc) in cell else "-" for m in methods)]
          for rc in recipes]
  commands = (args.out / "commands.txt").read_text().split("\n") if (args.out / "commands.txt").exists() else []
  lines = ["Commands (each adds the cells it lacks to results.csv; `--summarize` rewrites this file):", "",
           *(f"    {c}" for c in commands if c), "",
           f"{dense['test_images']} CIFAR-10 test images; dense {float(dense['accuracy']):.2f}%; wall times on a "
           "2-core CPU shared with other work (an upper bound of the cost).", "",
           "Accuracy (%) at the same allocation (tp_global_l1: its own):", "",
           *_report.markdown_table(["method", *recipes], body), "", "Wall time per cell (allocation, fusion, "
           "repair, distillation, fine-tuning; synthesis counted in bn / distill):", "",
           *_report.markdown_table(["recipe", *methods], cost), "", "Fusion and merging methods against default "
           "pruning at equal allocation and recipe:", ""]
  for m in [m for m in FUSION if m in methods]:
    wins = [(float(cell[(m, rc)]["accuracy"]) - float(cell[("default", rc)]["accuracy"]))
            for rc in recipes if (m, rc) in cell and ("default", rc) in cell]
    if wins:
      lines.append(f"- {m}: beats default in {sum(w > 0 for w in wins)} of {len(wins)} recipes "
                   f"(mean {np.mean(wins):+.2f} points)")
  (args.out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
