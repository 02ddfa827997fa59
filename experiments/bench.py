"""How fast is whole-network Intra-Fusion? ifjax against a per-group NumPy + POT reference, cold and warm.

    python experiments/bench.py --out docs/results/bench            # the full run (about 15 min, 2 CPU cores)
    python experiments/bench.py --models resnet56_internal --no-scaling --repeats 3 --out /tmp/bench

Writes ``bench.md`` (and ``bench.json``) under ``--out``:

* **Whole network, ratio 0.5, l1, paper normalisation.** For each model: a *cold* first call in a fresh
  process (``python -c``; with and without the imports of jax, ifjax and POT; XLA compilations counted
  with ``jax.monitoring``; the peak resident memory above the RSS before the call, Linux only), also for a
  process that finds its programs in a persistent compilation cache filled by an earlier one (``+cache``:
  :func:`ifjax.enable_compilation_cache`, so no compiler in its time or memory), then *warm* calls in this
  process, ifjax exact, ifjax Sinkhorn and the reference interleaved, min and median over ``--repeats``.
* **The reference** implements the authors' algorithm per group with NumPy, ``scipy.spatial.distance.cdist``
  (cityblock), ``ot.emd`` and ``np.tensordot`` on the same BN-folded weights (folding is not timed for it),
  and the table gives the largest difference between its maps and fused weights and ifjax's.
* **One group's fusion time** against its width n (64 ... 4096 neurons, d = 512 features) for both
  solvers, with the log-log slope between successive sizes.
* **The cost matrix alone** on three of ResNet50's group shapes, p = 1 and 2: ifjax's kernels, SciPy's
  ``cdist``, OTT-JAX's ``PointCloud`` costs and the matmul form of the Euclidean distance, with their
  speed (n * m * d per second) and their largest difference from a float64 ``cdist``.

Timings depend on the machine and its load; the tables say what they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

MODELS = {  # name: (zoo model, pretrained?, groups: "internal" = block-internal only, None = all)
    "resnet20": ("resnet20", True, None),
    "resnet56_internal": ("resnet56", True, "internal"),
    "resnet56": ("resnet56", True, None),
    "vgg11_bn": ("vgg11_bn", False, None),
    "resnet18": ("resnet18", False, None),
    "resnet50": ("resnet50", False, None),
}
INPUT = {"vgg11_bn": (1, 32, 32, 3), "resnet18": (1, 32, 32, 3), "resnet50": (1, 224, 224, 3)}
RATIO = 0.5


# -- the model under test ---------------------------------------------------------------------------
def load(name: str):
  """(variables, spec, groups) of a benchmark model."""
  import jax
  import jax.numpy as jnp

  import ifjax

  zoo, pretrained, which = MODELS[name]
  if pretrained:
    _, spec, variables = ifjax.models.pretrained(zoo)
  else:
    module, spec = ifjax.models.get(zoo, num_classes=1000 if zoo == "resnet50" else 10)
    variables = jax.jit(module.init)(jax.random.key(0), jnp.ones(INPUT[zoo]))
  groups = [g.name for g in spec.groups if not g.name.startswith("stream")] if which == "internal" else None
  return jax.device_get(variables), spec, groups


def fuse_ifjax(variables, spec, groups, solver: str):
  import jax

  import ifjax
  return jax.block_until_ready(ifjax.intra_fuse(variables, spec, RATIO, groups=groups, solver=solver))


# -- the reference: the authors' algorithm, per group, in NumPy / SciPy / POT ----------------------------
def reference(folded_flat: dict, spec, groups) -> tuple[dict, dict]:
  """``({group: (m, n) map}, {path: fused array})`` on BN-folded flat weights; only weight members
  (kernels) are fused, as the authors' code does for the layers it edits."""
  import numpy as np
  import ot
  from scipy.spatial.distance import cdist

  from ifjax._fuse import kept_count
  from ifjax._importance import group_size

  maps, fused = {}, {}
  for g in spec.select(groups):
    members = [mb for mb in g.members if np.ndim(folded_flat[mb.path]) >= 2]
    n = group_size(folded_flat, g)
    rows = [np.asarray(mb.neurons_first(folded_flat[mb.path]), np.float32)[mb.offset:mb.offset + n].reshape(n, -1)
            for mb in members]
    imp = np.mean([np.abs(r).sum(1) for r in rows], axis=0)
    imp = imp / imp.mean()
    m = kept_count(n, RATIO)
    keep = np.sort(np.argsort(-imp, kind="stable")[:m])
    x = np.concatenate(rows, 1)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    cost = cdist(x, x[keep], "cityblock")
    t = ot.emd(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost)
    mp = (t / t.sum(1, keepdims=True)).T.astype(np.float32)  # (m, n): the paper's map, both sides
    maps[g.name] = mp
    for mb in members:  # members that own their whole axis (no segments); an array can be edited on 2 axes
      if mb.offset == 0 and np.asarray(mb.neurons_first(folded_flat[mb.path])).shape[0] == n:
        seg = np.asarray(mb.neurons_first(fused.get(mb.path, folded_flat[mb.path])), np.float32)
        fused[mb.path] = np.asarray(mb.restore(np.tensordot(mp, seg, axes=1)))
  return maps, fused


# -- a cold first call, in a fresh process ------------------------------------------------------------
COLD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax, numpy, ot, scipy.spatial  # the imports a user's first call pays for
import ifjax
t_import = time.perf_counter() - t0
sys.path.insert(0, {here!r})
import bench
solver = {who!r}.split("+")[0]
if {who!r}.endswith("+cache"):  # a process after one that filled the persistent compilation cache
  ifjax.enable_compilation_cache({cache!r})
variables, spec, groups = bench.load({name!r})
compiles = [0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, d, **kw: compiles.__setitem__(
        0, compiles[0] + (event == "/jax/core/compile/backend_compile_duration")))
hits = [0]  # programs loaded from the persistent cache (still counted as compiles by the event above)
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.__setitem__(0, hits[0] + (event == "/jax/compilation_cache/cache_hits")))
def status(key):  # kB, from /proc/self/status (Linux)
  return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
rss0 = status("VmRSS")
if {who!r} == "reference":
  folded = ifjax._batchnorm.folded_flat(ifjax._spec.on_host(variables), spec)
  t1 = time.perf_counter(); bench.reference(folded, spec, groups); first = time.perf_counter() - t1
else:
  t1 = time.perf_counter(); bench.fuse_ifjax(variables, spec, groups, solver); first = time.perf_counter() - t1
c_first, h_first = compiles[0], hits[0]
rss1 = status("VmHWM")
t2 = time.perf_counter()
if {who!r} != "reference":
  bench.fuse_ifjax(variables, spec, groups, solver)
second = time.perf_counter() - t2
print(json.dumps(dict(imports=t_import, first=first, compiles_first=c_first, cache_hits_first=h_first, second=second,
                      compiles_second=compiles[0] - c_first, peak_rss_growth_mb=(rss1 - rss0) / 1024)))
"""


def cold(name: str, who: str) -> dict:
  """A fresh process's first and second call. ``who``: ``exact``, ``sinkhorn``, ``reference``, or
  ``exact+cache`` / ``sinkhorn+cache``: the process after one that filled an empty persistent compilation
  cache (:func:`ifjax.enable_compilation_cache`), so it loads its programs instead of compiling them."""
  import tempfile

  with tempfile.TemporaryDirectory() as cache:
    code = COLD.format(here=str(pathlib.Path(__file__).parent), name=name, who=who, cache=cache)
    for _ in range(2 if who.endswith("+cache") else 1):
      out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
      if out.returncode:
        raise RuntimeError(f"cold run {name}/{who} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# -- warm, interleaved --------------------------------------------------------------------------------
def warm(name: str, repeats: int) -> dict:
  import jax
  import numpy as np

  import ifjax
  from ifjax._batchnorm import folded_flat
  from ifjax._spec import flatten, on_host

  variables, spec, groups = load(name)
  folded = folded_flat(on_host(variables), spec)
  contenders = {
      "exact": lambda: fuse_ifjax(variables, spec, groups, "exact"),
      "sinkhorn": lambda: fuse_ifjax(variables, spec, groups, "sinkhorn"),
      "reference": lambda: reference(folded, spec, groups),
  }
  results = {k: f() for k, f in contenders.items()}  # warm-up, and the results compared below
  times: dict[str, list[float]] = {k: [] for k in contenders}
  for _ in range(repeats):
    for k, f in contenders.items():
      t = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t)
  ref_maps, ref_fused = results["reference"]
  pl = ifjax.plan(variables, spec, RATIO, groups=groups)
  map_diff = max(float(np.abs(np.asarray(pl[g].consumer_map) - ref_maps[g]).max()) for g in ref_maps)
  out_flat = flatten(results["exact"])
  # arrays whose other axis belongs to a segment group (option-A streams) are not fused whole by the reference
  same = [(np.asarray(out_flat[p]), v) for p, v in ref_fused.items() if np.shape(out_flat[p]) == v.shape]
  weight_diff = max(float(np.abs(a - v).max()) for a, v in same)
  params = sum(np.size(a) for a in jax.tree.leaves(variables["params"]))
  largest_plan = max(np.size(p.transport) for p in pl.values())
  return dict(groups=len(pl), compared_arrays=len(same), params=int(params), param_mb=4 * params / 2**20,
              largest_plan_mb=4 * largest_plan / 2**20, map_diff=map_diff, weight_diff=weight_diff,
              **{f"{k}_min": min(v) for k, v in times.items()},
              **{f"{k}_median": statistics.median(v) for k, v in times.items()})


# -- one group, growing n -------------------------------------------------------------------------------
def scaling(sizes: list[int], repeats: int, cap_s: float) -> list[dict]:
  import jax
  import numpy as np

  import ifjax
  from ifjax import Group, Member, Spec

  rng = np.random.default_rng(0)
  spec = Spec(groups=(Group("hidden", producers=(Member("params/l1/kernel", -1), Member("params/l1/bias", 0)),
                            consumers=(Member("params/l2/kernel", 0),)),))
  rows, stopped = [], set()
  for n in sizes:
    v = {"params": {"l1": {"kernel": rng.normal(size=(256, n)).astype(np.float32), "bias": np.zeros(n, np.float32)},
                    "l2": {"kernel": rng.normal(size=(n, 256)).astype(np.float32)}}}
    row = {"n": n}
    for solver in ("exact", "sinkhorn"):
      if solver in stopped:
        continue
      ifjax.intra_fuse(v, spec, RATIO, solver=solver)  # compile for this shape
      ts = []
      for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(ifjax.intra_fuse(v, spec, RATIO, solver=solver))
        ts.append(time.perf_counter() - t)
      row[solver] = min(ts)
      if min(ts) > cap_s:
        stopped.add(solver)
    rows.append(row)
  return rows


# -- the cost matrix alone ---------------------------------------------------------------------------------
COST_SHAPES = [(2048, 1024, 4584), (512, 256, 6656), (256, 128, 3328)]  # ResNet50's stream4, layer4_1 and layer3_1


def cost_kernels(repeats: int) -> list[dict]:
  """Each contender's (n, m) cost of L2-normalised random rows against m of them (warm, interleaved): seconds,
  n * m * d per second, largest difference from SciPy's float64 ``cdist``, largest kept-to-itself distance."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ott.geometry import costs, pointcloud
  from scipy.spatial.distance import cdist

  from ifjax import _transport

  ott = {p: jax.jit(lambda a, b, fn=fn: pointcloud.PointCloud(a, b, cost_fn=fn).cost_matrix)
         for p, fn in ((1.0, costs.PNormP(1.0)), (2.0, costs.Euclidean()))}
  ott_sq = jax.jit(lambda a, b: jnp.sqrt(jnp.maximum(pointcloud.PointCloud(a, b, cost_fn=costs.SqEuclidean())
                                                     .cost_matrix, 0.0)))
  matmul = jax.jit(lambda a, b: jnp.sqrt(jnp.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :]
                                                     - 2.0 * jnp.dot(a, b.T, precision="highest"), 0.0)))
  rows = []
  for n, m, d in COST_SHAPES:
    rng = np.random.default_rng(0)
    x = np.asarray(_transport.normalize_rows(rng.normal(size=(n, d)).astype(np.float32)))
    keep = np.sort(rng.choice(n, m, replace=False)).astype(np.int32)
    y, jx = x[keep], jnp.asarray(x)
    jy = jx[keep]
    contenders = {
        (1.0, "ifjax, NumPy input (one program, 256 x 256 tiles)"): lambda: _transport.host_distance(x, y, 1.0),
        (1.0, "ifjax kept_distance (kept block once)"): lambda: _transport.kept_distance(x, keep, 1.0),
        (1.0, "ifjax, jax input (jit-able, one program per shape)"): lambda: _transport._pairwise_tiled(jx, jy, p=1.0),
        (1.0, "SciPy cdist (float64)"): lambda: cdist(x, y, "cityblock"),
        (1.0, "OTT PointCloud, PNormP(1)"): lambda: ott[1.0](jx, jy),
        (2.0, "ifjax, NumPy input (BLAS matmul form, near pairs redone)"): lambda: _transport.host_distance(x, y, 2.0),
        (2.0, "ifjax, jax input (differences, jit-able)"): lambda: _transport._pairwise_tiled(jx, jy, p=2.0),
        (2.0, "matmul form, XLA, unrepaired"): lambda: matmul(jx, jy),
        (2.0, "OTT PointCloud, Euclidean"): lambda: ott[2.0](jx, jy),
        (2.0, "OTT PointCloud, sqrt(SqEuclidean)"): lambda: ott_sq(jx, jy),
        (2.0, "SciPy cdist (float64)"): lambda: cdist(x, y, "euclidean"),
    }
    exact = {1.0: cdist(x.astype(np.float64), y.astype(np.float64), "cityblock"),
             2.0: cdist(x.astype(np.float64), y.astype(np.float64), "euclidean")}
    out = {k: np.asarray(f(), np.float64) for k, f in contenders.items()}  # compiles
    times = {k: [] for k in contenders}
    for _ in range(repeats):
      for k, f in contenders.items():
        t = time.perf_counter()
        np.asarray(f())
        times[k].append(time.perf_counter() - t)
    for (p, who), o in out.items():
      rows.append(dict(n=n, m=m, d=d, p=p, contender=who, seconds=min(times[p, who]),
                       rate=n * m * d / min(times[p, who]) / 1e9, error=float(np.abs(o - exact[p]).max()),
                       self_distance=float(np.abs(o[keep, np.arange(m)]).max())))
    print("costs", n, m, d, flush=True)
  return rows


# -- report ----------------------------------------------------------------------------------------------
def report(meta: dict, colds: dict, warms: dict, scale: list[dict], kernels: list[dict]) -> str:
  import math

  lines = [f"Machine: {meta['machine']}; jax {meta['jax']}, POT {meta['pot']}, NumPy {meta['numpy']}. "
           f"Command: `{meta['command']}`.", ""]
  if warms:
    lines += ["**Warm** (this process, interleaved, seconds, min / median over "
              f"{meta['repeats']} repeats; ratio 0.5, l1, paper normalisation):", "",
              "| model | groups | ifjax exact | ifjax Sinkhorn | NumPy/POT reference | reference / ifjax exact | "
              "max map diff | max weight diff (arrays) |", "|---|---|---|---|---|---|---|---|"]
    for name, w in warms.items():
      lines.append(f"| {name} | {w['groups']} | {w['exact_min']:.3f} / {w['exact_median']:.3f} | "
                   f"{w['sinkhorn_min']:.3f} / {w['sinkhorn_median']:.3f} | "
                   f"{w['reference_min']:.3f} / {w['reference_median']:.3f} | "
                   f"{w['reference_min'] / w['exact_min']:.2f}x | {w['map_diff']:.1e} | {w['weight_diff']:.1e} "
                   f"({w['compared_arrays']}) |")
    lines.append("")
  if colds:
    lines += ["**Cold** (a fresh process: the first call with imports excluded; in brackets, with the imports of "
              "jax, ifjax, POT and SciPy; then a second call; XLA compilations; peak RSS above the RSS before the "
              "call; +cache: the process after one that filled a persistent compilation cache):", "",
              "| model | contender | first call (s) | compiles | second call (s) | compiles | "
              "peak RSS above start (MB) | 3 x params + largest plan (MB) |", "|---|---|---|---|---|---|---|---|"]
    for (name, who), c in colds.items():
      w = warms.get(name)
      bound = f"{3 * w['param_mb'] + w['largest_plan_mb']:.0f}" if w else ""
      second = f"{c['second']:.3f}" if who != "reference" else ""
      hits = f" ({c['cache_hits_first']} from the cache)" if c.get("cache_hits_first") else ""
      lines.append(f"| {name} | {who} | {c['first']:.3f} ({c['first'] + c['imports']:.2f}) | "
                   f"{c['compiles_first']}{hits} | {second} | {c['compiles_second'] if who != 'reference' else ''} | "
                   f"{c['peak_rss_growth_mb']:.0f} | {bound} |")
    lines.append("")
  if scale:
    lines += ["**One group** (n neurons -> n/2, d = 512 features; warm, min of the repeats, seconds; slope = "
              "log-log slope from the previous size):", "", "| n | exact | slope | Sinkhorn | slope |",
              "|---|---|---|---|---|"]
    prev = None
    for r in scale:
      cells = []
      for s in ("exact", "sinkhorn"):
        t = r.get(s)
        slope = (f"{math.log(t / prev[s]) / math.log(r['n'] / prev['n']):.2f}"
                 if t and prev and prev.get(s) else "")
        cells += [f"{t:.4f}" if t else "(skipped)", slope]
      lines.append(f"| {r['n']} | " + " | ".join(cells) + " |")
      prev = r
    lines.append("")
  if kernels:
    lines += ["**The cost matrix alone** (L2-normalised random rows, n against m of them, d features; warm, min of "
              "the repeats; rate = n * m * d / time; error = largest difference from SciPy's float64 `cdist`; "
              "self = largest distance of a kept row to itself):", "",
              "| n x m x d | p | contender | seconds | G/s | error | self |", "|---|---|---|---|---|---|---|"]
    for r in kernels:
      lines.append(f"| {r['n']} x {r['m']} x {r['d']} | {r['p']:g} | {r['contender']} | {r['seconds']:.4f} | "
                   f"{r['rate']:.1f} | {r['error']:.1e} | {r['self_distance']:.1e} |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--no-cold", action="store_true")
  ap.add_argument("--no-scaling", action="store_true")
  ap.add_argument("--no-costs", action="store_true", help="skip the cost-matrix contenders")
  ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
  ap.add_argument("--cap", type=float, default=30.0, help="seconds: a solver stops growing n after a slower point")
  ap.add_argument("--out", type=pathlib.Path, required=True)
  args = ap.parse_args(argv)
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  import jax
  import numpy as np
  import ot

  meta = dict(machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}",
              jax=jax.__version__, pot=ot.__version__, numpy=np.__version__, repeats=args.repeats,
              command="python experiments/bench.py " + " ".join(sys.argv[1:] if argv is None else argv))
  colds, warms = {}, {}
  for name in args.models:
    if not args.no_cold:
      for who in ("exact", "exact+cache", "sinkhorn", "sinkhorn+cache", "reference"):
        colds[name, who] = cold(name, who)
        print(name, who, "cold", colds[name, who], flush=True)
    warms[name] = warm(name, args.repeats)
    print(name, "warm", warms[name], flush=True)
  scale = [] if args.no_scaling else scaling(args.sizes, max(1, min(args.repeats, 3)), args.cap)
  kernels = [] if args.no_costs else cost_kernels(args.repeats)
  text = report(meta, colds, warms, scale, kernels)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "bench.md").write_text(text)
  (args.out / "bench.json").write_text(json.dumps(dict(meta=meta, cold={f"{k[0]}/{k[1]}": v for k, v in colds.items()},
                                                       warm=warms, scaling=scale, costs=kernels), indent=1))
  print(text)


if __name__ == "__main__":
  main()
