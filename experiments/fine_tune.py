r"""Fine-tuning after pruning (the setting of the paper's Table 1) on the real pretrained CIFAR ResNets.

Every group (block-internal and stream groups) is pruned one-shot to a neuron sparsity with default
pruning or Intra-Fusion (l1, exact OT, `paper` normalization), then fine-tuned with the paper's recipe
(SGD, momentum 0.9, lr 0.01, batch 128, flip + random crop) on the CIFAR-10 JPEG training set; test
accuracy on the 10,000 test images after 0 (data-free), 1, 2, ... epochs.

    python experiments/fine_tune.py --model resnet20 --out results/fine_tune_resnet20
    python experiments/fine_tune.py --model resnet20 --train-limit 10000 --epochs 5 \
        --out docs/results/fine_tune_resnet20

``--train-limit`` makes an "epoch" one pass over a class-balanced subset of that many training images
(for CPU budgets). Writes ``results.csv`` (one row per method, sparsity and epoch; an interrupted run
resumes from it), ``results.md`` and ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import ifjax
from ifjax import data, finetune, train

import _report

FIELDS = ["model", "method", "sparsity", "epoch", "accuracy", "train_images", "seconds"]
METHODS = {"default": dict(method="default"), "if": dict(method="if", normalization="paper"),
           "if_bary": dict(method="if", normalization="barycentric")}
REPORT_EPOCHS = (0, 1, 2, 5)


def run(args) -> list[dict]:
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "results.csv"
  rows = _report.read_csv(path)
  done = {(r["method"], float(r["sparsity"])) for r in rows if int(r["epoch"]) == args.epochs}
  _, _, variables = ifjax.models.pretrained(args.model)
  x, y = data.cifar10_jpeg("train", limit=args.train_limit)
  train_set = (data.preprocess(args.model, x), y)
  xt, yt = data.cifar10_jpeg("test", limit=args.test_limit)
  test_set = (data.preprocess(args.model, xt), yt)
  augment = train.flip_crop(4, fill=data.black_pixel(args.model))  # torchvision pads with black pixels
  module, _ = ifjax.models.get(args.model)
  dense = train.evaluate(module, variables, test_set)
  print(f"{args.model}: dense test accuracy {100 * dense:.2f}% on {len(yt)} images; fine-tuning on {len(y)} training "
        f"images per epoch", flush=True)
  with _report.CsvAppender(path, FIELDS) as appender:
    for s in args.sparsities:
      for m in args.methods:
        if (m, s) in done:
          continue
        t0 = time.perf_counter()
        r = finetune.prune_and_finetune(args.model, variables, s, train_set, finetune_epochs=args.epochs,
                                        eval_data=test_set, augment=augment, seed=args.seed,
                                        unfold_bn=not args.folded_bn, **METHODS[m])
        h = r.history[0]
        accs = [h["accuracy_pruned"]] + [e["eval_accuracy"] for e in h.get("epochs", [])]
        new = [dict(model=args.model, method=m, sparsity=s, epoch=epoch, accuracy=round(100 * acc, 2),
                    train_images=len(y), seconds=round(time.perf_counter() - t0, 1)) for epoch, acc in enumerate(accs)]
        appender.add(*new)
        rows += [{k: str(v) for k, v in row.items()} for row in new]
        print(f"  {m:8s} sparsity {s}: " + " -> ".join(f"{100 * a:.2f}" for a in accs), flush=True)
  write_report(rows, out, args, dense)
  return rows


def write_report(rows: list[dict], out: pathlib.Path, args, dense: float):
  table = {(r["method"], float(r["sparsity"]), int(r["epoch"])): float(r["accuracy"]) for r in rows}
  epochs = [e for e in REPORT_EPOCHS if e <= args.epochs] + ([args.epochs] if args.epochs not in REPORT_EPOCHS else [])
  header = ["sparsity", "method", *(f"epoch {e}" for e in epochs)]
  body = [[str(s), m, *(f"{table[m, s, e]:.2f}" if (m, s, e) in table else "" for e in epochs)]
          for s in args.sparsities for m in args.methods]
  lines = ["```", "python " + " ".join(sys.argv), "```", "",
           f"Dense {args.model}: {100 * dense:.2f}% on the test images. All groups pruned one-shot, l1 importance; "
           f"fine-tuning epochs over {rows[0]['train_images'] if rows else '?'} training images.", "",
           *_report.markdown_table(header, body)]
  cells = [{m: table[m, s, e] for m in args.methods if (m, s, e) in table} for s in args.sparsities for e in epochs]
  for m in [m for m in args.methods if m != "default"]:
    w = _report.win_rate(cells, m)
    if w.cells:
      lines.append(f"\n{m} beats default in {w.wins}/{w.cells} cells (mean gain {w.mean_gain:+.2f} points).")
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines[4:]))
  panels = {f"{args.model}, sparsity {s}": {m: sorted((e, a) for (mm, ss, e), a in table.items() if (mm, ss) == (m, s))
                                            for m in args.methods} for s in args.sparsities}
  _report.plot_curves(panels, out / "accuracy.png", xlabel="fine-tuning epochs", reference=100 * dense, sharey=False)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
  ap.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
  ap.add_argument("--methods", nargs="+", default=["default", "if"], choices=sorted(METHODS))
  ap.add_argument("--epochs", type=int, default=5)
  ap.add_argument("--train-limit", type=int, default=None, help="class-balanced training subset per epoch")
  ap.add_argument("--test-limit", type=int, default=None, help="class-balanced test subset (default: all 10,000)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--folded-bn", action="store_true",
                  help="fine-tune the folded BNs as they are (before ifjax.unfold_batchnorm existed)")
  ap.add_argument("--out", required=True)
  run(ap.parse_args(argv))


if __name__ == "__main__":
  main()
