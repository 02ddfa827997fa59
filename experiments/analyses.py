"""The paper's analyses (§5, App. C) on real pretrained CIFAR ResNets: output preservation, the loss-landscape
plane, accuracy against sparsity per group.

    python experiments/analyses.py --model resnet20 --limit 1000 --out docs/results/analyses

Data-free, l1 importance, single groups (paper numbering, 0 = closest to the output); IF uses the paper's
normalization. Writes, per model, ``{model}_output_g{G}.png`` (histograms of the ℓ2 distance between pruned and
original logits, the paper's Fig. 5), ``{model}_plane_g{G}_s{S}.png`` and ``.npz`` (loss and accuracy on the
plane through the original, default-pruned and IF models, Fig. 6), ``{model}_accuracy_grid.png`` (from an
existing ``experiments/data_free.py`` CSV, Figs. 3-4), and ``{model}.md`` with the numbers and the command.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import time

import numpy as np

import ifjax
from ifjax import analysis, data

GRIDS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results"


def parse_plane(text: str) -> tuple[int, float]:
  """'10:0.5' -> (10, 0.5): paper group index and sparsity."""
  group, _, sparsity = text.partition(":")
  try:
    return int(group), float(sparsity)
  except ValueError:
    raise argparse.ArgumentTypeError(f"a plane is GROUP:SPARSITY, e.g. 10:0.5, got {text!r}") from None


def grid_rows(path: pathlib.Path, model: str, methods: list[str]) -> list[dict]:
  """The l1 rows (and the dense row) of ``experiments/data_free.py``'s results.csv."""
  with open(path, newline="") as f:
    return [r for r in csv.DictReader(f) if r["model"] == model and (r["method"] == "dense" or (
        r["importance"] == "l1" and r["method"] in methods))]


def run_model(model: str, args, lines: list[str]):
  module, spec, variables = ifjax.models.pretrained(model)
  x, y = data.cifar10_jpeg("test", limit=args.limit)
  x = data.preprocess(model, x)
  apply_fn = lambda v, xb: module.apply(v, xb, train=False)
  out = args.out
  lines += [f"## {model}", "", f"{len(y)} class-balanced CIFAR-10 JPEG test images, l1 importance, no data for "
            "the pruning, no fine-tuning.", ""]

  lines += ["### Output preservation", "", "Mean ℓ2 distance between the pruned and the original logits "
            "(lower is better):", "", "| group | sparsity | default | IF | IF < default (samples) |",
            "|---|---|---|---|---|"]
  for g in args.groups:
    t0 = time.perf_counter()
    name = spec[g].name
    dist = analysis.output_preservation(apply_fn, variables, spec, args.sparsities, x, groups=g,
                                        batch_size=args.batch_size)
    fig = analysis.plot_output_distances(dist, title=f"{model}, group {g} ({name}): distance to the original logits")
    fig.savefig(out / f"{model}_output_g{g}.png", dpi=110)
    for s in args.sparsities:
      d, f = dist["default", s], dist["IF", s]
      lines.append(f"| {g} ({name}) | {s:g} | {d.mean():.3f} | {f.mean():.3f} | {np.mean(f < d):.0%} |")
    print(f"{model} output preservation, group {g}: {time.perf_counter() - t0:.0f} s", flush=True)

  lines += ["", "### Loss-landscape plane", "", f"{args.size} × {args.size} grid (margin {args.margin:g}); the "
            "values at the three anchors:", "", "| group | sparsity | model | loss | accuracy (%) | distance to "
            "original |", "|---|---|---|---|---|---|"]
  for g, s in args.planes:
    t0 = time.perf_counter()
    name = spec[g].name
    plane = analysis.loss_plane(apply_fn, analysis.pruned_triplet(variables, spec, s, groups=g), x, y,
                                size=args.size, margin=args.margin, batch_size=args.batch_size)
    stem = f"{model}_plane_g{g}_s{s:g}"
    np.savez(out / f"{stem}.npz", **plane._asdict())
    fig = analysis.plot_plane(plane, title=f"{model}, group {g} ({name}) at sparsity {s:g}")
    fig.savefig(out / f"{stem}.png", dpi=110)
    for k, label in enumerate(plane.labels):
      lines.append(f"| {g} ({name}) | {s:g} | {label} | {plane.anchor_loss[k]:.3f} | {plane.anchor_accuracy[k]:.1f} | "
                   f"{np.hypot(*plane.anchors[k]):.2f} |")
    best = np.unravel_index(np.argmax(plane.accuracy), plane.accuracy.shape)
    lines.append(f"| {g} ({name}) | {s:g} | best grid point (u = {plane.u[best[1]]:.2f}, v = {plane.v[best[0]]:.2f}) "
                 f"| {plane.loss[best]:.3f} | {plane.accuracy[best]:.1f} | |")
    print(f"{model} plane, group {g} at {s:g}: {time.perf_counter() - t0:.0f} s", flush=True)

  csv_path = GRIDS / f"{model}_l1" / "results.csv"
  if csv_path.exists():
    rows = grid_rows(csv_path, model, args.methods)
    test_images = next(r["test_images"] for r in rows)
    fig = analysis.plot_accuracy_grid(rows, methods=args.methods,
                                      title=f"{model}, l1, data-free ({test_images} test images)")
    fig.savefig(out / f"{model}_accuracy_grid.png", dpi=110)
    lines += ["", "### Accuracy against sparsity", "", f"Drawn from `{csv_path.relative_to(GRIDS.parent.parent)}`; "
              f"no new evaluation.", ""]
  lines.append("")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", nargs="+", default=["resnet20"], help="CIFAR ResNets with public weights")
  ap.add_argument("--limit", type=int, default=1000, help="class-balanced subset of the test set")
  ap.add_argument("--groups", type=int, nargs="+", default=[0, 1], help="groups for the output histograms")
  ap.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3], help="for the histograms")
  ap.add_argument("--planes", type=parse_plane, nargs="*", default=[(10, 0.5)], help="GROUP:SPARSITY per plane")
  ap.add_argument("--size", type=int, default=11, help="grid points per axis of each plane")
  ap.add_argument("--margin", type=float, default=0.2, help="grid margin, a fraction of the anchors' extent")
  ap.add_argument("--methods", nargs="+", default=["default", "if_paper", "if_bary"], help="for the accuracy grid")
  ap.add_argument("--batch-size", type=int, default=500)
  ap.add_argument("--out", type=pathlib.Path, required=True)
  args = ap.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  command = "python experiments/analyses.py " + " ".join(sys.argv[1:] if argv is None else argv)
  for model in args.model:
    t0 = time.perf_counter()
    lines = [f"`{command}`", ""]
    run_model(model, args, lines)
    lines.append(f"{model}: {time.perf_counter() - t0:.0f} s in all.")
    (args.out / f"{model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
  main()
