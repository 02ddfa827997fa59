r"""The paper's data-free experiment (§4.2, Tables 10-21) on a zoo model with real pretrained weights.

Each cell prunes one group (paper numbering, 0 = closest to the output) or all
groups at once to a neuron sparsity, with default pruning or Intra-Fusion, and
measures test accuracy: no data for the fusion itself, no fine-tuning.

    python experiments/data_free.py --model resnet20 --out results/resnet20_l1
    python experiments/data_free.py --model resnet20 --importance taylor lamp --out results/resnet20_taylor_lamp
    python experiments/data_free.py --model resnet56 --all-groups-only --sparsities 0.3 0.5 0.7 --out results/r56_all
    python experiments/data_free.py --model resnet20 --methods default if_paper if_bary if_bary+bias \
        if_bary+centroid if_bary+mass --out results/resnet20_variants

Writes ``results.csv`` (one row per cell and method; an interrupted run resumes
from it), ``results.md`` (table + win rates) and ``accuracy.png``. Methods:
``default`` (keep the m most important), ``if_paper`` / ``if_bary`` (Intra-Fusion
with the paper's or the barycentric normalization), and variants made by adding
``+bias`` (biases in the cost), ``+centroid`` (k-means target) or ``+mass``
(importance marginals) to an ``if_`` method; ``+bn`` (also on ``default``) is
*data-light*: BN statistics re-estimated on 500 unlabelled training images. Every pruned model is evaluated as
the full-size network with the dropped channels zeroed
(``apply_plan(..., keep_shapes=True)``), which computes the same function as
the smaller network and needs one compilation for the whole grid.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import ifjax
from ifjax import data

import _report

FIELDS = ["model", "importance", "group", "group_name", "sparsity", "method", "accuracy", "params", "test_images"]
BASES = {"default": dict(fuse=False), "if_paper": dict(normalization="paper"),
         "if_bary": dict(normalization="barycentric")}
MODIFIERS = {"bias": dict(include_bias=True), "centroid": dict(target="cluster_centroid"),
             "mass": dict(source_mass="importance", target_mass="importance"),
             "bn": {}}  # data-light: BN statistics re-estimated on unlabelled training images after pruning


def method_options(name: str) -> dict:
  """'if_bary+bias+mass' -> keyword arguments of :func:`ifjax.plan` ('+bn' is applied after the plan)."""
  base, *mods = name.split("+")
  if base not in BASES or any(m not in MODIFIERS for m in mods) or (base == "default" and set(mods) - {"bn"}):
    raise ValueError(f"unknown method {name!r}: use default or default+bn, or one of "
                     f"{sorted(set(BASES) - {'default'})} followed by any of {['+' + m for m in MODIFIERS]}")
  opts = dict(BASES[base])
  for m in mods:
    opts.update(MODIFIERS[m])
  return opts


def load_test_set(model: str, limit: int | None):
  """(images float32 NHWC, labels int32) of the model's evaluation set, preprocessed."""
  if _cifar(model):
    x, y = data.cifar10_jpeg("test", limit=limit)
  elif model == "lenet5":
    x, y = data.mnist_test()
  elif model == "efficientnet_lite0":
    x, y = data.imagenet_sample()
  else:
    raise ValueError(f"no real test set for {model!r}; models with one: resnet20..110, lenet5, efficientnet_lite0")
  if limit is not None and not _cifar(model):
    x, y = x[:limit], y[:limit]
  return data.preprocess(model, x), y


def _cifar(model: str) -> bool:
  return data.MODEL_PREPROCESS.get(model) == "cifar_resnet"


def load_model(model: str, checkpoint: pathlib.Path | None):
  """``(module, spec, variables)``: public weights (a file, or the default one), or a directory written by
  ``ifjax.save`` (e.g. by experiments/train_cifar.py)."""
  if checkpoint is not None and checkpoint.is_dir():
    variables, spec, widths, _ = ifjax.restore(checkpoint)
    module, _ = ifjax.models.get(model, widths=widths)
    return module, spec, variables
  return ifjax.models.pretrained(model, checkpoint)


_CALIBRATION: dict = {}


def calibration_batches(model: str, n: int, batch_size: int = 250):
  """Labelled training batches for Taylor importance and '+bn': CIFAR's *train* split, never test images."""
  if not _cifar(model):
    raise ValueError(f"taylor importance and +bn need training images, which ../shared/data has only for CIFAR "
                     f"(CIFAR ResNets, vgg11_bn, resnet18), not for {model!r}")
  if (model, n) not in _CALIBRATION:
    x, y = data.cifar10_jpeg("train", limit=n)
    x = data.preprocess(model, x)
    _CALIBRATION[model, n] = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
  return _CALIBRATION[model, n]


def importance_scores(name: str, module, variables, spec, model: str, calib: int) -> dict:
  """{group: (n,) scores}, computed once per importance and reused by every cell."""
  imp = name
  if name == "taylor":
    def loss_fn(v, batch):
      logits = module.apply(v, batch[0], train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
    imp = ifjax.importance.taylor(loss_fn=loss_fn, batches=calibration_batches(model, calib))
  full = ifjax.plan(variables, spec, 0.0, importance=imp, fuse=False)
  return {g: p.importance for g, p in full.items()}


def make_evaluator(module, x, y, batch_size: int):
  predict = jax.jit(lambda v, xb: module.apply(v, xb, train=False).argmax(-1))

  def accuracy(variables) -> float:
    variables = jax.device_put(variables, jax.devices()[0])  # fused on the host CPU (--fusion-device cpu)?
    hits = sum(int((np.asarray(predict(variables, xb)) == yb).sum()) for xb, yb in data.batches(x, y, batch_size))
    return 100.0 * hits / len(y)

  return accuracy


def recalibrated_accuracy(module, variables, spec, pl, calib, x, y, args) -> float:
  """Accuracy of the reduced model after :func:`ifjax.recalibrate_batchnorm` on the calibration images."""
  small, _ = ifjax.models.get(args.model, num_classes=module.num_classes, widths=ifjax.widths(variables, spec, pl))
  fixed = ifjax.recalibrate_batchnorm(small.apply, ifjax.apply_plan(variables, spec, pl), variables, spec, pl,
                                      [xb for xb, _ in calib])
  return make_evaluator(small, x, y, args.batch_size)(fixed)


def param_count(variables, spec, pl) -> int:
  shapes = jax.eval_shape(lambda v: ifjax.apply_plan(v, spec, pl), variables)
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes["params"])))


def read_rows(path: pathlib.Path) -> list[dict]:
  return [dict(r, sparsity=float(r["sparsity"]), accuracy=float(r["accuracy"])) for r in _report.read_csv(path)]


def run(args) -> list[dict]:
  module, spec, variables = load_model(args.model, args.checkpoint)
  x, y = load_test_set(args.model, args.limit)
  accuracy = make_evaluator(module, x, y, args.batch_size)
  out = args.out
  out.mkdir(parents=True, exist_ok=True)
  csv_path = out / "results.csv"
  rows = read_rows(csv_path)
  done = {(r["importance"], r["group"], r["sparsity"], r["method"]) for r in rows
          if r["model"] == args.model and int(r["test_images"]) == len(y)}
  if done:
    print(f"resuming: {len(done)} cells already in {csv_path}")

  selections = ([] if args.all_groups_only else
                [(str(spec.paper_index(g.name)), g.name) for g in spec.select(args.groups)])
  selections.append(("all", None))
  n_params = int(sum(np.prod(np.shape(a)) for a in jax.tree.leaves(variables["params"])))
  cells = [(imp, sel, s, meth) for imp in args.importance for sel in selections for s in args.sparsities
           for meth in args.methods if (imp, sel[0], s, meth) not in done]
  with _report.CsvAppender(csv_path, FIELDS) as appender:
    if ("-", "-", 0.0, "dense") not in done:
      dense = accuracy(variables)
      appender.add(dict(model=args.model, importance="-", group="-", group_name="-", sparsity=0.0, method="dense",
                        accuracy=dense, params=n_params, test_images=len(y)))
      print(f"{args.model} dense: {dense:.2f}% on {len(y)} test images, {n_params:,} parameters")
    scores = {}
    if args.fusion_device == "cpu":  # committed to the CPU, so every eager fusion op runs there
      variables = jax.device_put(variables, jax.devices("cpu")[0])
    t0 = time.perf_counter()
    bar = tqdm(cells, desc=f"{args.model} grid", disable=None, dynamic_ncols=True)
    for imp, (label, group), s, meth in bar:
      if imp not in scores:
        scores[imp] = importance_scores(imp, module, variables, spec, args.model, args.calibration_images)
      solver = {} if meth.startswith("default") else dict(solver=args.solver, epsilon=args.epsilon)
      pl = ifjax.plan(variables, spec, s, groups=group, importance=scores[imp], **method_options(meth), **solver)
      if "bn" in meth.split("+")[1:]:
        acc = recalibrated_accuracy(module, variables, spec, pl,
                                    calibration_batches(args.model, args.calibration_images), x, y, args)
      else:
        acc = accuracy(ifjax.apply_plan(variables, spec, pl, keep_shapes=True))
      row = dict(model=args.model, importance=imp, group=label, group_name=group or "all", sparsity=s, method=meth,
                 accuracy=round(acc, 2), params=param_count(variables, spec, pl), test_images=len(y))
      appender.add(row)
      bar.set_postfix_str(f"{label}@{s:.1f} {meth} {acc:.1f}%")
    if cells:
      print(f"{len(cells)} cells in {time.perf_counter() - t0:.0f} s")
  return [r for r in read_rows(csv_path) if r["model"] == args.model and int(r["test_images"]) == len(y)]


# -- reporting ----------------------------------------------------------------------------------------
def _group_order(group: str) -> tuple[bool, int]:
  """Sort key of a group label: paper indices 0, 1, ... in order, then "all"."""
  return group == "all", int(group) if group.isdigit() else 0


def summarize(rows: list[dict], methods: list[str], min_sparsity: float = 0.3) -> str:
  """Markdown: the accuracy table, then win rate and mean gain of each method over default."""
  dense = next((r["accuracy"] for r in rows if r["method"] == "dense"), float("nan"))
  cells: dict[tuple, dict] = {}
  for r in rows:
    if r["method"] != "dense":
      cells.setdefault((r["importance"], r["group"], r["group_name"], r["sparsity"]), {})[r["method"]] = r["accuracy"]
  body = []
  for key in sorted(cells, key=lambda k: (k[0], *_group_order(k[1]), k[3])):
    imp, group, name, s = key
    label = f"{group} ({name})" if group != "all" else "all groups"
    body.append([imp, label, f"{s:.1f}", *(f"{cells[key][m]:.2f}" if m in cells[key] else "" for m in methods)])
  lines = [f"dense model: {dense:.2f}%\n", *_report.markdown_table(["importance", "group", "sparsity", *methods], body),
           "", win_rates(cells, methods, min_sparsity, dense)]
  return "\n".join(lines) + "\n"


def win_rates(cells: dict, methods: list[str], min_sparsity: float, dense: float) -> str:
  """Per importance, method and sparsity: cells where the method beats default, and its mean gain (points).

  The last column keeps the cells (sparsity >= ``min_sparsity``) where default pruning costs at least
  2 points: the volatile groups, where there is something to recover.
  """
  others = [m for m in methods if m not in ("default", "default+bn")]
  single = {k: v for k, v in cells.items() if k[1] != "all"}
  if not others or not single:
    return ""

  def stat(imp: str, m: str, keep, volatile: bool = False) -> str:
    base = "default+bn" if m.endswith("+bn") else "default"
    kept = [v for k, v in single.items()
            if k[0] == imp and keep(k[3]) and (not volatile or v.get(base, math.inf) <= dense - 2)]
    return str(_report.win_rate(kept, m, base))

  sparsities = sorted({k[3] for k in single})
  high = lambda t: t >= min_sparsity - 1e-9
  body = [[imp, m, *(stat(imp, m, lambda t, s=s: t == s) for s in sparsities), stat(imp, m, high),
           stat(imp, m, high, volatile=True)] for imp in sorted({k[0] for k in single}) for m in others]
  header = ["importance", "method", *(f"{s:.1f}" for s in sparsities), f"≥ {min_sparsity}",
            f"≥ {min_sparsity}, default ≤ dense − 2"]
  return "\n".join(["Single-group cells: method beats default (default+bn for '+bn' methods) in wins/cells "
                    "(mean gain in points).", "", *_report.markdown_table(header, body)])


def plot(rows: list[dict], methods: list[str], path: pathlib.Path):
  """Accuracy vs sparsity, one panel per (importance, group)."""
  dense = next((r["accuracy"] for r in rows if r["method"] == "dense"), None)
  panels = {}
  for imp, group in sorted({(r["importance"], r["group"]) for r in rows if r["method"] != "dense"},
                           key=lambda k: (k[0], *_group_order(k[1]))):
    sub = [r for r in rows if r["importance"] == imp and r["group"] == group]
    title = f"{imp}: {group} {sub[0]['group_name']}" if group != "all" else f"{imp}: all groups"
    panels[title] = {m: sorted((r["sparsity"], r["accuracy"]) for r in sub if r["method"] == m) for m in methods}
  _report.plot_curves(panels, path, xlabel="neuron sparsity", reference=dense)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="resnet20", help="zoo model with pretrained weights: "
                  "resnet20, resnet56, lenet5, efficientnet_lite0; or vgg11_bn, resnet18 with --checkpoint")
  ap.add_argument("--checkpoint", type=pathlib.Path, help="weights file (default: the one under IFJAX_DATA "
                  "or the installed package), or an ifjax.save directory (experiments/train_cifar.py)")
  ap.add_argument("--importance", nargs="+", default=["l1"], help="l1, l2, linf, lamp, taylor, random")
  ap.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
  ap.add_argument("--groups", type=int, nargs="+", help="paper indices (0 = closest to the output); default all")
  ap.add_argument("--all-groups-only", action="store_true", help="only prune all groups at once")
  ap.add_argument("--methods", nargs="+", default=["default", "if_paper", "if_bary"])
  ap.add_argument("--limit", type=int, help="evaluate on a class-balanced subset of this many test images")
  ap.add_argument("--calibration-images", type=int, default=500, help="training images for taylor importance")
  ap.add_argument("--batch-size", type=int, default=500)
  ap.add_argument("--solver", choices=["exact", "sinkhorn"], default="exact", help="OT solver of the if_ methods")
  ap.add_argument("--epsilon", type=float, default=1e-3, help="Sinkhorn regularisation, relative to the largest cost")
  ap.add_argument("--fusion-device", choices=["default", "cpu"], default="default",
                  help="where plan/apply_plan run: 'cpu' keeps their many small eager ops off an accelerator, "
                       "whose per-shape compiles dominate there; evaluation stays on the default device")
  ap.add_argument("--out", type=pathlib.Path, required=True, help="folder for results.csv, results.md, accuracy.png")
  ap.add_argument("--report-only", action="store_true",
                  help="no model, no evaluation: rewrite results.md and accuracy.png from --out's results.csv")
  args = ap.parse_args(argv)
  for m in args.methods:
    method_options(m)
  t0 = time.perf_counter()
  if args.report_only:
    rows = [r for r in read_rows(args.out / "results.csv") if r["model"] == args.model]
    if not rows:
      raise SystemExit(f"--report-only: no rows for {args.model} in {args.out / 'results.csv'}")
  else:
    rows = run(args)
  methods = [m for m in args.methods]
  command = "python experiments/data_free.py " + " ".join(sys.argv[1:] if argv is None else argv)
  table = f"`{command}`\n\n" + summarize(rows, methods)
  (args.out / "results.md").write_text(table)
  plot(rows, methods, args.out / "accuracy.png")
  print(table)
  print(f"wrote {args.out}/results.csv, results.md, accuracy.png in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
