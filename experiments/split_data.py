r"""Split-Data (the paper's Section 6) at small scale: PaF and FaP against the whole-data model.

    python experiments/split_data.py --out results/split_data
    python experiments/split_data.py --model resnet20 --train-limit 10000 --train-epochs 5 --prune-epochs 1 \
        --finetune-epochs 1 --sparsities 0.3 0.5 --out docs/results/split_data_resnet20

From scratch (random init): k models on the C(k, k/2) half-data training sets train side by side on a
``("models", "data")`` mesh, each on ``--devices-per-model`` devices (simulated XLA:CPU devices unless real
ones exist; the script sets ``--xla_force_host_platform_device_count`` itself), with no traffic between
them. The whole-data model trains on ``--devices-per-model`` devices for the same epochs. Then per sparsity:

* PaF: prune every model with Intra-Fusion (``--prune-epochs`` of fine-tuning on the whole data), fuse the
  pruned models with activation-based OT (200 samples), fine-tune ``--finetune-epochs``;
* FaP: fuse, fine-tune ``--finetune-epochs``, prune (``--prune-epochs``);
* whole data: prune (``--prune-epochs``), fine-tune 2 x ``--finetune-epochs`` (the paper's equal total).

Writes ``results.csv``, ``results.md`` (accuracies and per-phase wall times) and ``times.png``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import _report


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="resnet20", help="a zoo CIFAR model (resnet20, vgg11_bn, resnet18, ...)")
  ap.add_argument("--k", type=int, default=2, help="folds (even); C(k, k/2) models")
  ap.add_argument("--devices-per-model", type=int, default=2)
  ap.add_argument("--train-limit", type=int, default=10000, help="class-balanced CIFAR-10 training subset")
  ap.add_argument("--test-limit", type=int, default=None)
  ap.add_argument("--train-epochs", type=int, default=5)
  ap.add_argument("--prune-epochs", type=int, default=1)
  ap.add_argument("--finetune-epochs", type=int, default=1)
  ap.add_argument("--steps", type=int, default=1, help="iterative pruning steps")
  ap.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5])
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--same-init", action="store_true", help="start every model (split and whole-data) from the same "
                  "random init (default: a different seed per model)")
  ap.add_argument("--out", required=True)
  return ap.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  import math
  models_count = math.comb(args.k, args.k // 2) if args.k % 2 == 0 else args.k
  devices = models_count * args.devices_per_model
  if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  run(args, models_count)


def run(args, models_count: int):
  import time

  import jax
  import jax.numpy as jnp

  import ifjax
  from ifjax import data, split_data, train

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  x, y = data.cifar10_jpeg("train", limit=args.train_limit)
  train_set = (data.preprocess(args.model, x), y)
  xt, yt = data.cifar10_jpeg("test", limit=args.test_limit)
  test_set = (data.preprocess(args.model, xt), yt)
  opts = dict(augment=train.flip_crop(4, fill=data.black_pixel(args.model)), batch_size=128)
  module, spec = ifjax.models.get(args.model)
  init = [module.init(jax.random.key(args.seed + (0 if args.same_init else i)), jnp.zeros((1, 32, 32, 3)))
          for i in range(models_count + 1)]
  cpus = jax.devices()
  pair_mesh = train.make_mesh({"models": models_count, "data": args.devices_per_model})
  one_mesh = train.make_mesh({"data": args.devices_per_model}, cpus[:args.devices_per_model])
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices; {models_count} split models x "
        f"{args.devices_per_model} devices; {len(y)} training images", flush=True)

  sets = split_data.split(train_set, args.k, seed=args.seed)
  optimizer = lambda s: train.paper_sgd("train", s)
  models, hist_split, t_split = split_data.train_models(module, init[:models_count], sets, epochs=args.train_epochs,
                                                       optimizer=optimizer, mesh=pair_mesh, eval_data=test_set,
                                                       seed=args.seed, **opts)
  t0 = time.perf_counter()
  whole, hist_whole = train.fit(module, init[-1], train_set, epochs=args.train_epochs, optimizer=optimizer,
                                mesh=one_mesh, eval_data=test_set, seed=args.seed, **opts)
  t_whole = time.perf_counter() - t0
  acc_split = hist_split[-1]["eval_accuracy"]
  acc_whole = hist_whole[-1]["eval_accuracy"]
  print(f"split models {[round(100 * a, 2) for a in acc_split]} in {t_split:.0f} s (together); whole-data "
        f"{100 * acc_whole:.2f} in {t_whole:.0f} s", flush=True)

  rows = []
  common = dict(prune_epochs=args.prune_epochs, steps=args.steps, eval_data=test_set, seed=args.seed,
                optimizer=lambda s: train.paper_sgd("finetune", s), **opts)
  for s in args.sparsities:
    results = {
        "PaF": split_data.prune_and_fuse(args.model, models, s, train_set, finetune_epochs=args.finetune_epochs,
                                         **common),
        "FaP": split_data.fuse_and_prune(args.model, models, s, train_set, finetune_epochs=args.finetune_epochs,
                                         **common),
        "whole data": split_data.whole_data(args.model, whole, s, train_set, finetune_epochs=2 * args.finetune_epochs,
                                            **common),
    }
    for name, r in results.items():
      train_s = t_split if name != "whole data" else t_whole
      rows.append(dict(sparsity=s, pipeline=name, accuracy=round(100 * r.accuracy, 2),
                       fused_accuracy=round(100 * r.history["fused_accuracy"], 2) if name != "whole data" else "",
                       train_s=round(train_s, 1), **{f"{k}_s": round(v, 1) for k, v in r.seconds.items()},
                       total_s=round(train_s + sum(r.seconds.values()), 1)))
      print(rows[-1], flush=True)
  fields = ["sparsity", "pipeline", "accuracy", "fused_accuracy", "train_s", "prune_s", "fuse_s", "finetune_s",
            "total_s"]
  _report.write_csv(out / "results.csv", fields, rows)
  report(rows, out, args, acc_split, acc_whole, t_split, t_whole, models_count)


def report(rows, out: pathlib.Path, args, acc_split, acc_whole, t_split, t_whole, models_count):
  per_model = t_split / models_count
  lines = ["```", "python " + " ".join(sys.argv), "```", "",
           f"{args.model} from scratch ({'one shared init' if args.same_init else 'a different init per model'}) on "
           f"{args.train_limit} CIFAR-10 JPEG training images ({args.train_epochs} epochs), "
           f"k = {args.k}: {models_count} half-data models on a (models={models_count}, data={args.devices_per_model}) "
           "mesh of simulated XLA:CPU devices that share this machine's cores.", "",
           f"- split models: {', '.join(f'{100 * a:.2f}%' for a in acc_split)}; "
           f"whole-data model: {100 * acc_whole:.2f}%",
           f"- training wall time: split models {t_split:.0f} s for all {models_count} together, whole-data model "
           f"{t_whole:.0f} s. Measured ratio whole / split-together: {t_whole / t_split:.2f}x. On disjoint hardware "
           f"each split model would run alone in about {per_model:.0f} s (its share of the shared cores), a "
           f"simulated training speed-up of {t_whole / per_model:.2f}x (paper, GPU: 1.81x).", ""]
  whole_total = {r["sparsity"]: r["total_s"] for r in rows if r["pipeline"] == "whole data"}
  body = []
  for r in rows:
    whole = r["pipeline"] == "whole data"
    speed = whole_total[r["sparsity"]] / (r["total_s"] - (0 if whole else r["train_s"] - per_model))
    body.append([str(r["sparsity"]), r["pipeline"], f"{r['accuracy']:.2f}", str(r["fused_accuracy"]),
                 str(r["train_s"] if whole else round(per_model, 1)),
                 *(str(r.get(k, "")) for k in ("prune_s", "fuse_s", "finetune_s")), f"{speed:.2f}x"])
  lines += _report.markdown_table(["sparsity", "pipeline", "accuracy", "after fusion", "train (s)", "prune (s)",
                                   "fuse (s)", "fine-tune (s)", "overall speed-up (simulated)"], body)
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines[4:]))
  fig, ax = _report.pyplot().subplots(figsize=(7, 3.5))
  labels = [f"{r['pipeline']}\n{r['sparsity']}" for r in rows]
  bottom = [0.0] * len(rows)
  for phase in ("train_s", "prune_s", "fuse_s", "finetune_s"):
    vals = [(per_model if phase == "train_s" and r["pipeline"] != "whole data" else r.get(phase) or 0) for r in rows]
    ax.bar(labels, vals, bottom=bottom, label=phase[:-2])
    bottom = [b + v for b, v in zip(bottom, vals)]
  ax.set(ylabel="wall seconds (split training: per model)", title=f"Split-Data phases, {args.model}")
  ax.legend()
  _report.save(fig, out / "times.png")


if __name__ == "__main__":
  main()
