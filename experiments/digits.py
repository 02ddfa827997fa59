"""The main job: data-free Intra-Fusion vs default pruning on a CNN trained on scikit-learn's digits.

Loads the small Conv-BN-ReLU network that ships with ifjax, trained on the 8x8 digits of scikit-learn
(1,797 real images; 1,347 train / 450 test; ``--train`` trains it again), traces its group spec with
``ifjax.trace_spec``, then prunes each group alone and all groups at once at several sparsities, without
data or fine-tuning, and prints test accuracy for default pruning and for Intra-Fusion in both
normalizations. With the shipped weights the table depends on no training run, so it is the same on any
machine (checked under XLA's AVX2 and SSE4.2 caps and OpenBLAS's Haswell kernels).

    python experiments/digits.py                 # ~20 s: the shipped weights
    python experiments/digits.py --out results/  # also writes CSV, markdown and a plot
    python experiments/digits.py --train --save-weights ifjax/models/weights/digits_cnn.npz  # how they were made
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import jax
import numpy as np
import optax
from flax.traverse_util import flatten_dict
from tqdm.auto import tqdm

import ifjax
from ifjax import data

import _report


def load_digits():
  """Returns (x_train, x_test, y_train, y_test): ``ifjax.data.digits`` (1,347 / 450 images), scaled to [0, 1]."""
  (xtr, ytr), (xte, yte) = data.digits("train"), data.digits("test")
  return data.preprocess("digits_cnn", xtr), data.preprocess("digits_cnn", xte), ytr, yte


def train(x, y, *, epochs: int, seed: int, batch: int = 64):
  """Adam + cross-entropy; returns Flax variables (params + batch_stats)."""
  model = ifjax.models.DigitsCNN()
  variables = model.init(jax.random.key(seed), x[:1])
  opt = optax.adam(2e-3)
  state = opt.init(variables["params"])

  @jax.jit
  def step(variables, state, xb, yb):
    def loss_fn(params):
      logits, upd = model.apply({**variables, "params": params}, xb, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd

    (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, state = opt.update(g, state)
    return {"params": optax.apply_updates(variables["params"], updates), **upd}, state, loss

  rng = np.random.default_rng(seed)
  for _ in tqdm(range(epochs), desc="train", leave=False, disable=None):
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
      idx = order[i:i + batch]
      variables, state, _ = step(variables, state, x[idx], y[idx])
  return variables


def one_core() -> None:
  """Runs this process, and so XLA's CPU thread pool, on one core. XLA splits a convolution or a reduction by its
  thread count, so training on 2 or 16 cores rounds differently and ends at different weights (and a different
  table); the CPU's instruction set and the jax version change them too, which is why the main job prunes the
  shipped weights by default. Effective only before jax's first computation; a no-op where the OS has no CPU
  affinity (macOS)."""
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def accuracy(variables, spec, x, y) -> float:
  model = ifjax.models.DigitsCNN(widths=tuple(ifjax.widths(variables, spec).items()))
  return float(np.mean(np.argmax(model.apply(variables, x, train=False), -1) == y)) * 100


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--train", action="store_true", help="train the CNN here instead of loading the shipped weights")
  ap.add_argument("--epochs", type=int, default=30, help="with --train")
  ap.add_argument("--seed", type=int, default=0, help="with --train; the train/test split is always seed 0's")
  ap.add_argument("--save-weights", type=pathlib.Path, metavar="FILE.npz", help="with --train: write the weights")
  ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
  ap.add_argument("--importance", default="l1")
  ap.add_argument("--out", type=pathlib.Path, help="folder for results.csv, results.md and accuracy.png")
  ap.add_argument("--all-cores", action="store_true",
                  help="with --train: train on every core: faster, but the weights then depend on the number of cores")
  args = ap.parse_args(argv)
  if args.save_weights and not args.train:
    ap.error("--save-weights needs --train (the shipped weights are already saved)")

  xtr, xte, ytr, yte = load_digits()
  t0 = time.perf_counter()
  if args.train:
    if not args.all_cores:
      one_core()
    variables = train(xtr, ytr, epochs=args.epochs, seed=args.seed)
    source = f"trained DigitsCNN ({args.epochs} epochs, seed {args.seed}) in {time.perf_counter() - t0:.1f} s"
  else:
    _, _, variables = ifjax.models.pretrained("digits_cnn")
    source = "loaded the DigitsCNN shipped with ifjax"
  # traced, not hand-written: groups conv0..conv2 (each conv's out channels, its bias and BN, the next layer's in
  # channels) and the three conv -> BN pairs
  spec = ifjax.trace_spec(ifjax.models.DigitsCNN().apply, variables, xte[:2])
  base = accuracy(variables, spec, xte, yte)
  print(f"{source}: test accuracy {base:.2f}% on {len(yte)} images")
  if args.save_weights:
    args.save_weights.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.save_weights, **{k: np.asarray(v) for k, v in flatten_dict(variables, sep="/").items()})
    print(f"wrote {args.save_weights}")

  methods = {
      "default": lambda g, s: ifjax.prune(variables, spec, s, groups=g, importance=args.importance),
      "IF paper": lambda g, s: ifjax.intra_fuse(variables, spec, s, groups=g, importance=args.importance),
      "IF barycentric": lambda g, s: ifjax.intra_fuse(variables, spec, s, groups=g, importance=args.importance,
                                                      normalization="barycentric"),
  }
  selections = [(f"group {spec.paper_index(n)} ({n})", n) for n in reversed(spec.names)] + [("all groups", None)]
  rows = []
  cells = [(label, sel, s) for label, sel in selections for s in args.sparsities]
  for label, sel, s in tqdm(cells, desc="prune", leave=False, disable=None):
    rows.append({"group": label, "sparsity": s, **{k: accuracy(f(sel, s), spec, xte, yte) for k, f in methods.items()}})

  header = ["group", "sparsity", *methods]
  body = [[r["group"], f"{r['sparsity']:.1f}", *(f"{r[k]:.2f}" for k in methods)] for r in rows]
  table = "\n".join(_report.markdown_table(header, body))
  wins = {k: _report.win_rate(rows, k) for k in methods if k != "default"}
  print(f"\nunpruned: {base:.2f}%   importance: {args.importance}   no data, no fine-tuning\n")
  print(table)
  print("\n" + ", ".join(f"{k} beats default in {w.wins}/{w.cells} cells" for k, w in wins.items()))

  if args.out:
    args.out.mkdir(parents=True, exist_ok=True)
    _report.write_csv(args.out / "results.csv", header, rows)
    (args.out / "results.md").write_text(table + "\n")
    panels = {g: {k: [(r["sparsity"], r[k]) for r in rows if r["group"] == g] for k in methods}
              for g in dict.fromkeys(r["group"] for r in rows)}
    _report.plot_curves(panels, args.out / "accuracy.png", xlabel="neuron sparsity", reference=base)
    print(f"wrote {args.out}/results.csv, results.md, accuracy.png")


if __name__ == "__main__":
  main()
