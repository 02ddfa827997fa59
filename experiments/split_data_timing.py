r"""Split-Data wall-clock speed-up, measured on this CPU (issue 23 item 2): one pinned process per model.

    python experiments/split_data_timing.py --out docs/results/split_data_timing

LeNet5 on the MNIST training images of ``split_data_grid.py`` (seed 0, sparsity ``--sparsity``), with its
schedule. Every phase runs in fresh processes (:func:`ifjax.split_data.run_pinned`) pinned with
``os.sched_setaffinity``; a process on one core runs XLA single-threaded, a process on two cores uses both
through XLA's intra-op threads (or, ``--device-per-core``, a 2-device mesh of single-threaded devices). Times are
from the clock inside each process around the work (JIT compilation included, interpreter start-up and imports
excluded); a parallel phase counts its slowest process.

* whole data, 1 core: train, then prune (steps x prune epochs) and fine-tune 2F, all on core 0;
* whole data, 2 cores: the same on cores 0 and 1 (one XLA device using both cores; ``--device-per-core``: a
  2-device data-parallel mesh, whose all-reduce timed out under load here);
* PaF: the two half-data models train at once, one per core; each is pruned and fine-tuned F on the whole
  data at once, one per core; fusion and F fine-tuning on both cores;
* FaP: the same training; fusion, F fine-tuning, pruning and F fine-tuning on both cores.

``os.getloadavg()`` is recorded before and after every phase: other users of the machine slow every phase.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import _report


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--per-class", type=int, default=500)
  ap.add_argument("--train-epochs", type=int, default=10)
  ap.add_argument("--every", type=int, default=2)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--prune-epochs", type=int, default=1)
  ap.add_argument("--finetune-epochs", type=int, default=1)
  ap.add_argument("--sparsity", type=float, default=0.5)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--device-per-core", action="store_true", help="a process on 2 cores trains data-parallel on a "
                  "2-device mesh (default: one device using both cores through XLA's intra-op threads)")
  ap.add_argument("--report-only", action="store_true", help="rewrite results.md / times.png from OUT/timing.json")
  ap.add_argument("--out", required=True)
  return ap.parse_args(argv)


def _mesh():
  import jax

  from ifjax import train

  return train.make_mesh({"data": jax.device_count()}) if jax.device_count() > 1 else None


def job_train(init, data, epochs: int, every: int, seed: int):
  from ifjax import train
  from ifjax._pinned import fit_job

  t0 = time.perf_counter()
  v, h = fit_job("lenet5", init, data, epochs=epochs, optimizer=functools.partial(train.paper_sgd, "train",
                                                                                  every=every),
                 batch_size=128, seed=seed, progress=False)
  return v, time.perf_counter() - t0


def job_whole(v, sparsity, data, steps, prune_epochs, finetune_epochs, seed):
  from ifjax import split_data

  r = split_data.whole_data("lenet5", v, sparsity, data, steps=steps, prune_epochs=prune_epochs,
                            finetune_epochs=2 * finetune_epochs, mesh=_mesh(), seed=seed, progress=False)
  return r.variables, r.widths, r.seconds


def job_prune_one(v, sparsity, data, steps, prune_epochs, finetune_epochs, seed):
  from ifjax import split_data

  t0 = time.perf_counter()
  r = split_data.prune_one("lenet5", v, sparsity, data, steps=steps, prune_epochs=prune_epochs,
                           after_prune_epochs=finetune_epochs, mesh=_mesh(), seed=seed, progress=False)
  return r.variables, r.widths, r.history, time.perf_counter() - t0


def job_paf_fuse(pruned, sparsity, data, finetune_epochs, seed):
  from ifjax import finetune, split_data

  build = finetune.model_builder("lenet5")
  results = []
  for v, widths, history in pruned:
    module, spec = build(widths)
    results.append(finetune.PruneResult(v, module, spec, widths, history))
  r = split_data.prune_and_fuse("lenet5", [], sparsity, data, prune_epochs=0, finetune_epochs=finetune_epochs,
                                pruned=results, mesh=_mesh(), seed=seed, progress=False)
  return r.variables, r.widths, r.seconds


def job_fap(models, sparsity, data, steps, prune_epochs, finetune_epochs, seed):
  from ifjax import split_data

  r = split_data.fuse_and_prune("lenet5", models, sparsity, data, steps=steps, prune_epochs=prune_epochs,
                                finetune_epochs=finetune_epochs, after_prune_epochs=finetune_epochs, mesh=_mesh(),
                                seed=seed, progress=False)
  return r.variables, r.widths, r.seconds


def main(argv=None):
  args = parse(argv)
  if args.report_only:
    saved = json.loads((pathlib.Path(args.out) / "timing.json").read_text())
    for k, v in saved["args"].items():
      setattr(args, k, v) if k not in ("report_only", "out") else None
    report(pathlib.Path(args.out), saved["log"], saved["accuracy"], args)
    return
  import jax
  import jax.numpy as jnp

  import ifjax
  from ifjax import split_data, train

  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  from split_data_grid import load_data

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  train_set, test_set = load_data(args.per_class)
  module, _ = ifjax.models.get("lenet5")
  inits = [module.init(jax.random.key(k), jnp.zeros((1, 28, 28, 1))) for k in (0, 1, 2)]
  halves = split_data.split(train_set, 2, seed=args.seed)
  s, F, p, st, seed = args.sparsity, args.finetune_epochs, args.prune_epochs, args.steps, args.seed
  log, acc = [], {}
  cores = split_data.core_sets(2)
  both = [tuple(c for cs in cores for c in cs)]

  def phase(pipeline, name, fn, jobs, core):
    res = split_data.run_pinned(fn, jobs, cores=core, device_per_core=args.device_per_core)
    secs = [o[-1] if isinstance(o[-1], float) else sum(o[-1].values()) for o in res.outputs]
    log.append(dict(pipeline=pipeline, phase=name, seconds=round(max(secs), 2), per_process=[round(x, 2) for x in secs],
                    wall=round(res.wall, 2), cores=[list(c) for c in res.cores],
                    loadavg_before=[round(x, 2) for x in res.loadavg[0]],
                    loadavg_after=[round(x, 2) for x in res.loadavg[1]]))
    print(log[-1], flush=True)
    return res.outputs

  def finish(pipeline, variables, widths):
    small, _ = ifjax.models.get("lenet5", widths=widths)
    acc[pipeline] = round(100 * train.evaluate(small, variables, test_set), 2)

  tr = (args.train_epochs, args.every, seed)
  for label, core in (("whole data, 1 core", [cores[0]]), ("whole data, 2 cores", both)):
    (v, _), = phase(label, "train", job_train, [((inits[2], train_set, *tr), {})], core)
    (v, w, _), = phase(label, "prune + fine-tune", job_whole, [((v, s, train_set, st, p, F, seed), {})], core)
    finish(label, v, w)
  outs = phase("split (PaF / FaP)", "train", job_train, [((inits[i], halves[i], *tr), {}) for i in range(2)], cores)
  models = [o[0] for o in outs]
  pruned = phase("PaF", "prune + fine-tune (per model)", job_prune_one,
                 [((m, s, train_set, st, p, F, seed + 100 * i), {}) for i, m in enumerate(models)], cores)
  (v, w, _), = phase("PaF", "fuse + fine-tune", job_paf_fuse, [(([o[:3] for o in pruned], s, train_set, F, seed),
                                                                 {})], both)
  finish("PaF", v, w)
  (v, w, _), = phase("FaP", "fuse + fine-tune + prune + fine-tune", job_fap,
                     [((models, s, train_set, st, p, F, seed), {})], both)
  finish("FaP", v, w)
  (out / "timing.json").write_text(json.dumps(dict(log=log, accuracy=acc, args=vars(args),
                                                   cpu=os.cpu_count(), affinity=sorted(os.sched_getaffinity(0))),
                                              indent=1))
  report(out, log, acc, args)


def report(out: pathlib.Path, log, acc, args):
  def total(pipeline):
    own = [r["seconds"] for r in log if r["pipeline"] == pipeline]
    shared = [r["seconds"] for r in log if r["pipeline"] == "split (PaF / FaP)"] if pipeline in ("PaF", "FaP") else []
    return sum(own) + sum(shared)

  def train_s(pipeline):
    key = "split (PaF / FaP)" if pipeline in ("PaF", "FaP") else pipeline
    return sum(r["seconds"] for r in log if r["pipeline"] == key and r["phase"] == "train")

  lines = ["# Split-Data speed-up measured on this CPU (LeNet5, MNIST)", "", "```",
           "python experiments/" + pathlib.Path(sys.argv[0]).name + " " + " ".join(
               a for a in sys.argv[1:] if a != "--report-only"), "```", "",
           f"{args.train_epochs} training epochs ({10 * args.per_class} images; split models {5 * args.per_class} "
           f"each), sparsity {args.sparsity}, "
           f"{args.steps} x {args.prune_epochs} pruning epochs, F = {args.finetune_epochs}. Each phase in fresh "
           "processes pinned to cores (os.sched_setaffinity); one core: XLA single-threaded; two cores: "
           f"{'a 2-device mesh' if args.device_per_core else 'one XLA device using both (intra-op threads)'}; "
           "seconds from the clock "
           "in the process around the work (compilation included, start-up excluded); a parallel phase counts its "
           "slowest process. Load average (1 min) before / after each phase: other engineers' jobs share these "
           "two cores, so every number carries that noise.", ""]
  body = [[r["pipeline"], r["phase"], f"{r['seconds']:.1f}", " / ".join(f"{x:.1f}" for x in r["per_process"]),
           " + ".join(",".join(map(str, c)) for c in r["cores"]),
           f"{r['loadavg_before'][0]:.2f} / {r['loadavg_after'][0]:.2f}"] for r in log]
  lines += _report.markdown_table(["pipeline", "phase", "seconds", "per process", "cores", "load before / after"],
                                  body) + [""]
  one, two = total("whole data, 1 core"), total("whole data, 2 cores")
  body = []
  for pl in ("whole data, 1 core", "whole data, 2 cores", "PaF", "FaP"):
    body.append([pl, f"{acc.get(pl, float('nan')):.2f}", f"{train_s(pl):.1f}", f"{total(pl):.1f}",
                 f"{train_s('whole data, 1 core') / train_s(pl):.2f}x", f"{one / total(pl):.2f}x",
                 f"{train_s('whole data, 2 cores') / train_s(pl):.2f}x", f"{two / total(pl):.2f}x"])
  lines += _report.markdown_table(["pipeline", "test accuracy", "training s", "end to end s",
                                   "training speed-up vs whole 1 core", "end-to-end vs whole 1 core",
                                   "training vs whole 2 cores", "end-to-end vs whole 2 cores"], body)
  lines += ["", "![phase times](times.png)"]
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  fig, ax = _report.pyplot().subplots(figsize=(7, 3.5))
  pls = ["whole data, 1 core", "whole data, 2 cores", "PaF", "FaP"]
  bottom = [0.0] * 4
  phases = [("train", lambda pl: train_s(pl))] + [
      (ph, functools.partial(lambda ph, pl: sum(r["seconds"] for r in log if r["pipeline"] == pl and r["phase"] == ph),
                             ph)) for ph in dict.fromkeys(r["phase"] for r in log if r["phase"] != "train")]
  for name, fn in phases:
    vals = [fn(pl) for pl in pls]
    ax.bar(pls, vals, bottom=bottom, label=name)
    bottom = [b + v for b, v in zip(bottom, vals)]
  ax.set(ylabel="wall seconds (measured)", title="Split-Data phases on 2 CPU cores, LeNet5 / MNIST")
  ax.legend(fontsize=7)
  _report.save(fig, out / "times.png")


if __name__ == "__main__":
  main()
