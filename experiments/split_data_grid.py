r"""Split-Data with converged models (issue 23): PaF, FaP and the whole-data pipeline at equal total retraining.

    python experiments/split_data_grid.py --out docs/results/split_data_lenet5_mnist              # IID, 3 seeds
    python experiments/split_data_grid.py --out docs/results/split_data_lenet5_mnist --variant skew0.8
    python experiments/split_data_grid.py --out docs/results/split_data_lenet5_mnist --variant k4 --seeds 0
    python experiments/split_data_grid.py --out docs/results/split_data_lenet5_mnist --variant overlap0.3 --seeds 0
    python experiments/split_data_grid.py --out docs/results/split_data_lenet5_mnist --summarize

Data: the 10,000 MNIST images on disk (the test split; no training split is stored) are divided once, class-
balanced, into ``--per-class`` x 10 training images and the rest for testing. Per seed (a different split and
init): the split models (k=2 halves, or the C(k, k/2) sets of ``--variant``) and the whole-data model train
``--train-epochs`` epochs (the paper's SGD, lr 0.05 halved every ``--every`` epochs, batch 128). Then, at each
sparsity, the paper's structure with ``--steps`` pruning steps of ``--prune-epochs`` epochs each:

* PaF: each model pruned (Intra-Fusion) and fine-tuned F = ``--finetune-epochs`` on the whole data; the pruned
  models fused (activation-based OT, 200 samples); fine-tuned F;
* FaP: fused; fine-tuned F; pruned; fine-tuned F;
* whole data: pruned; fine-tuned 2F (the same total retraining after the iterative pruning).

Resumable: trained models go to ``OUT/models/``, every finished cell is a line of ``OUT/rows.jsonl``; a rerun
skips what is there. ``--summarize`` writes ``results.md``, ``results.csv`` and the plots.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import _report

PIPELINES = ("PaF", "FaP", "whole data")


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="lenet5")
  ap.add_argument("--per-class", type=int, default=500, help="training images per class (the rest: test)")
  ap.add_argument("--variant", default="iid", help="iid | skewS (e.g. skew0.8) | k4 | overlapO (e.g. overlap0.3)")
  ap.add_argument("--train-epochs", type=int, default=10)
  ap.add_argument("--every", type=int, default=2, help="epochs between halvings of the training lr")
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--prune-epochs", type=int, default=1)
  ap.add_argument("--finetune-epochs", type=int, default=1)
  ap.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
  ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
  ap.add_argument("--summarize", action="store_true")
  ap.add_argument("--out", required=True)
  return ap.parse_args(argv)


def load_data(per_class: int):
  import numpy as np

  from ifjax import data

  x, y = data.mnist_test()
  x = data.preprocess("lenet5", x)
  order = np.random.default_rng(1234).permutation(len(y))
  train = np.sort(np.concatenate([order[y[order] == c][:per_class] for c in range(10)]))
  test = np.setdiff1d(np.arange(len(y)), train)
  return (x[train], y[train]), (x[test], y[test])


def split_sets(train_set, variant: str, seed: int):
  from ifjax import split_data

  if variant == "iid":
    return split_data.split(train_set, 2, seed=seed)
  if variant.startswith("skew"):
    return split_data.split(train_set, 2, seed=seed, skew=float(variant[4:]))
  if variant.startswith("overlap"):
    return split_data.split(train_set, 2, seed=seed, overlap=float(variant[7:]))
  if variant.startswith("k"):
    return split_data.split(train_set, int(variant[1:]), seed=seed)
  raise SystemExit(f"unknown --variant {variant!r}")


def save_vars(path: pathlib.Path, variables, history):
  import numpy as np
  from flax import traverse_util

  flat = traverse_util.flatten_dict(variables, sep="/")
  np.savez(f"{path}.npz", **{k: np.asarray(v) for k, v in flat.items()})  # not with_suffix: "skew0.8_s0" has a dot
  pathlib.Path(f"{path}.json").write_text(json.dumps(history))


def load_vars(path: pathlib.Path):
  import numpy as np
  from flax import traverse_util

  if not pathlib.Path(f"{path}.npz").exists():
    return None
  with np.load(f"{path}.npz") as f:
    flat = {k: f[k] for k in f.files}
  return traverse_util.unflatten_dict(flat, sep="/"), json.loads(pathlib.Path(f"{path}.json").read_text())


def trained(args, out: pathlib.Path, train_set, test_set, seed: int, variant: str):
  """(split models, their histories, whole-data model, its history), trained or read from OUT/models."""
  import jax
  import jax.numpy as jnp

  import ifjax
  from ifjax import split_data, train

  module, _ = ifjax.models.get(args.model)
  opt = functools.partial(train.paper_sgd, "train", every=args.every)
  kw = dict(epochs=args.train_epochs, optimizer=opt, batch_size=128, eval_data=test_set, progress=False)
  mdir = out / "models"
  mdir.mkdir(parents=True, exist_ok=True)
  whole = load_vars(mdir / f"whole_s{seed}")
  if whole is None:
    t0 = time.perf_counter()
    v, h = train.fit(module, module.init(jax.random.key(1000 + seed), jnp.zeros((1, 28, 28, 1))), train_set,
                     seed=seed, **kw)
    print(f"whole-data model seed {seed}: {100 * h[-1]['eval_accuracy']:.2f}% in {time.perf_counter() - t0:.0f} s",
          flush=True)
    save_vars(mdir / f"whole_s{seed}", v, h)
    whole = (v, h)
  sets = split_sets(train_set, variant, seed)
  models = [load_vars(mdir / f"{variant}_s{seed}_m{i}") for i in range(len(sets))]
  if any(m is None for m in models):
    inits = [module.init(jax.random.key(100 * seed + i), jnp.zeros((1, 28, 28, 1))) for i in range(len(sets))]
    t0 = time.perf_counter()
    vs, hist, _ = split_data.train_models(module, inits, sets, seed=seed, **kw)
    print(f"{variant} seed {seed}: split models {[round(100 * a, 2) for a in hist[-1]['eval_accuracy']]} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    for i, v in enumerate(vs):
      h = [{"epoch": e["epoch"], "eval_accuracy": e["eval_accuracy"][i], "loss": float(e["loss"][i])} for e in hist]
      save_vars(mdir / f"{variant}_s{seed}_m{i}", v, h)
    models = [load_vars(mdir / f"{variant}_s{seed}_m{i}") for i in range(len(sets))]
  return [m[0] for m in models], [m[1] for m in models], whole[0], whole[1], [len(s[1]) for s in sets]


def claim(out: pathlib.Path, key: str) -> bool:
  """True for the first process to ask for ``key`` (several processes may share one OUT; a killed run's claims
  are removed with ``rm OUT/claims/*`` before resuming)."""
  (out / "claims").mkdir(exist_ok=True)
  try:
    (out / "claims" / key).open("x").close()
    return True
  except FileExistsError:
    return False


def _curve(history) -> list[float]:
  return [round(100 * e["eval_accuracy"], 2) for e in history]


def run(args):
  from ifjax import split_data, train

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows_path = out / "rows.jsonl"
  done = set()
  if rows_path.exists():
    done = {(r["variant"], r["seed"], r["sparsity"], r["pipeline"]) for r in map(json.loads, rows_path.open())}
  with (out / "commands.log").open("a") as f:
    f.write("python " + " ".join(sys.argv) + "\n")
  train_set, test_set = load_data(args.per_class)
  ft = functools.partial(train.paper_sgd, "finetune")
  F, p = args.finetune_epochs, args.prune_epochs
  common = dict(steps=args.steps, prune_epochs=p, eval_data=test_set, batch_size=128, optimizer=ft, progress=False)
  for seed in args.seeds:
    models, split_hist, whole, whole_hist, sizes = trained(args, out, train_set, test_set, seed, args.variant)
    for s in args.sparsities:
      for name in args.pipelines:
        variant = "iid" if name == "whole data" else args.variant  # one baseline per seed and sparsity
        if (variant, seed, s, name) in done or not claim(out, f"{variant}_s{seed}_{s}_{name.replace(' ', '_')}"):
          continue
        t0 = time.perf_counter()
        if name == "PaF":
          r = split_data.prune_and_fuse(args.model, models, s, train_set, finetune_epochs=F, after_prune_epochs=F,
                                        seed=seed, **common)
          recover = r.history["finetune"]
          pruned_acc = [h[0]["accuracy_pruned"] for k, h in r.history.items() if k.startswith("prune_")]
        elif name == "FaP":
          r = split_data.fuse_and_prune(args.model, models, s, train_set, finetune_epochs=F, after_prune_epochs=F,
                                        seed=seed, **common)
          recover = r.history["finetune"]
          pruned_acc = [r.history["prune"][0]["accuracy_pruned"]]
        else:
          r = split_data.whole_data(args.model, whole, s, train_set, finetune_epochs=2 * F, seed=seed, **common)
          recover = r.history["prune"][-1]["epochs"]
          pruned_acc = [r.history["prune"][0]["accuracy_pruned"]]
        row = dict(variant=variant, seed=seed, sparsity=s, pipeline=name, accuracy=round(100 * r.accuracy, 2),
                   fused_accuracy=(round(100 * r.history["fused_accuracy"], 2) if name != "whole data" else None),
                   first_prune_accuracy=[round(100 * a, 2) for a in pruned_acc], recovery_curve=_curve(recover),
                   widths=r.widths, seconds={k: round(v, 1) for k, v in r.seconds.items()},
                   wall=round(time.perf_counter() - t0, 1), split_sizes=sizes,
                   split_accuracy=[_curve(h)[-1] for h in split_hist], whole_accuracy=_curve(whole_hist)[-1],
                   schedule=dict(train_epochs=args.train_epochs, every=args.every, steps=args.steps, prune_epochs=p,
                                 finetune_epochs=F))
        with rows_path.open("a") as f:
          f.write(json.dumps(row) + "\n")
        print({k: row[k] for k in ("variant", "seed", "sparsity", "pipeline", "accuracy", "fused_accuracy", "wall")},
              flush=True)


def converged(curve: list[float]) -> tuple[bool, float]:
  """The gain over the last 20% of the epochs (points) and whether it is < 0.5."""
  tail = max(1, round(0.2 * len(curve)))
  gain = curve[-1] - curve[-1 - tail]
  return gain < 0.5, round(gain, 2)


def summarize(args):
  import numpy as np

  out = pathlib.Path(args.out)
  rows = [json.loads(line) for line in (out / "rows.jsonl").open()]
  lines = ["# Split-Data with converged models: LeNet5 on MNIST", "", "Commands (in order; each resumes):", "", "```"]
  lines += sorted(set((out / "commands.log").read_text().splitlines()), key=lambda c: ("summarize" in c, c))
  sched = rows[0]["schedule"]
  lines += ["```", "", f"Data: the 10,000 MNIST images on disk, {args.per_class} per class for training "
            f"({10 * args.per_class}), the other {10000 - 10 * args.per_class} for testing. Training: "
            f"{sched['train_epochs']} epochs, SGD momentum 0.9, lr 0.05 halved every {sched['every']} epochs, batch "
            f"128 (split models: the same epochs on their half). Pruning: Intra-Fusion, {sched['steps']} steps x "
            f"{sched['prune_epochs']} epoch(s); F = {sched['finetune_epochs']} fine-tuning epochs after the pruning "
            f"and after the fusion (PaF, FaP), 2F after the pruning (whole data); fine-tuning SGD lr 0.01. Fusion: "
            "activation-based OT, 200 training images. Every model from its own random init.", ""]
  # convergence
  lines += ["## Convergence (gain over the last 20% of the training epochs, points; converged if < 0.5)", ""]
  body = []
  mdir = out / "models"
  curves = {}
  for path in sorted(mdir.glob("*.json")):
    c = [round(100 * e["eval_accuracy"], 2) for e in json.loads(path.read_text())]
    curves[path.name[:-5]] = c
    ok, gain = converged(c)
    body.append([path.name[:-5], f"{c[-1]:.2f}", f"{gain:+.2f}", "yes" if ok else "**no**"])
  lines += _report.markdown_table(["model", "final test accuracy", "last-20% gain", "converged"], body) + [""]
  fig, axes = _report.pyplot().subplots(1, 2, figsize=(10, 3.5))
  for name, c in curves.items():
    ax = axes[0] if name.startswith(("whole", "iid")) else axes[1]
    ax.plot(range(1, len(c) + 1), c, label=name, lw=1)
  for ax, t in zip(axes, ("IID halves and whole-data models", "skewed / k=4 / overlapping sets")):
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=t, ylim=(90, 100))
    ax.legend(fontsize=6)
  _report.save(fig, out / "learning_curves.png")
  lines += ["![learning curves](learning_curves.png)", ""]
  # accuracy table: mean over seeds
  lines += ["## Accuracy at equal total retraining (mean over seeds; in brackets each seed)", ""]
  base = {(r["seed"], r["sparsity"]): r["accuracy"] for r in rows if r["pipeline"] == "whole data"}
  body, csv_rows = [], []
  for variant in sorted({r["variant"] for r in rows}, key=lambda v: (v != "iid", v)):
    for s in sorted({r["sparsity"] for r in rows}):
      for name in PIPELINES:
        cell = [r for r in rows if r["variant"] == variant and r["sparsity"] == s and r["pipeline"] == name]
        if not cell or (variant != "iid" and name == "whole data"):
          continue
        accs = [r["accuracy"] for r in cell]
        ref = [base[(r["seed"], s)] for r in cell if (r["seed"], s) in base]
        gap = np.mean(accs) - np.mean(ref) if len(ref) == len(accs) else float("nan")
        fused = [r["fused_accuracy"] for r in cell if r["fused_accuracy"] is not None]
        recover = [_epochs_to(r["recovery_curve"], base.get((r["seed"], s))) for r in cell]
        body.append([variant, str(s), name, f"{np.mean(accs):.2f}", " / ".join(f"{a:.2f}" for a in accs),
                     "" if name == "whole data" else f"{gap:+.2f}",
                     "" if name == "whole data" else ("yes" if gap >= -0.5 else "**no**"),
                     f"{np.mean(fused):.2f}" if fused else "",
                     " / ".join(str(e) for e in recover) if name != "whole data" else "",
                     f"{np.mean([r['wall'] for r in cell]):.0f}"])
        csv_rows.append(dict(variant=variant, sparsity=s, pipeline=name, accuracy=round(float(np.mean(accs)), 2),
                             seeds=len(accs), gap_to_whole=round(float(gap), 2) if name != "whole data" else "",
                             fused_accuracy=round(float(np.mean(fused)), 2) if fused else ""))
  lines += _report.markdown_table(["split", "sparsity", "pipeline", "accuracy", "per seed", "vs whole data",
                                   "within 0.5", "after fusion (before fine-tuning)",
                                   "fine-tuning epochs to reach whole data (per seed; - = never)",
                                   "wall s (shared CPU)"], body)
  _report.write_csv(out / "results.csv", ["variant", "sparsity", "pipeline", "accuracy", "seeds", "gap_to_whole",
                                          "fused_accuracy"], csv_rows)
  if (out / "notes.md").exists():  # the hand-written reading of the numbers
    lines += ["", (out / "notes.md").read_text().rstrip()]
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


def _epochs_to(curve: list[float], target: float | None) -> str:
  if target is None:
    return "?"
  for i, a in enumerate(curve, start=1):
    if a >= target - 0.5:
      return str(i)
  return "-"


def main(argv=None):
  args = parse(argv)
  if args.summarize:
    summarize(args)
  else:
    run(args)


if __name__ == "__main__":
  main()
