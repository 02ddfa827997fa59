"""The README's coverage table: which models ifjax traces, checks, fuses, and fuses exactly.

    python experiments/coverage_table.py [model ...]

Per model of tests/coverage_models.py (small, random init, nothing downloaded): traced (groups exact /
pruning-only), ``check_spec`` passes, ``intra_fuse`` at ratio 0.25 on every group of at most 128 neurons
runs (the flaxmodels ResNets' 256-2048-wide groups make the exact OT slow on a CPU), the exact groups of those
pruned at 0.25 run at their smaller shapes with ``ifjax.resize`` (relative difference to the full-size model on
the zero-padded ``keep_shapes=True`` variables, and the parameter counts), and exact-duplicate
preservation: a neuron planted as a copy of another in every exact group, fused into it with barycentric
maps (``keep_shapes=True``), changes the output by the relative amount shown (the control: the same fusion
without planted copies). Prints a markdown table.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import time

import ifjax


def _models():
  path = pathlib.Path(__file__).parents[1] / "tests" / "coverage_models.py"
  spec = importlib.util.spec_from_file_location("coverage_models", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["coverage_models"] = module
  spec.loader.exec_module(module)
  return module


def row(cm, name: str) -> str:
  t0 = time.perf_counter()
  try:
    case = cm.build(name)
    spec = ifjax.trace_spec(case.apply, case.variables, case.x)
  except Exception as e:  # noqa: BLE001 - the table records why a model is not covered
    return f"| {name} | no: {type(e).__name__}: {str(e)[:80]} | | | | | |"
  exact = sum(g.exact for g in spec.groups)
  traced = f"yes: {exact} exact + {len(spec.groups) - exact} pruning-only groups"
  try:
    ifjax.check_spec(case.apply, case.variables, spec, case.x)
    checked = "yes"
  except ifjax.SpecCheckError as e:
    checked = f"no: {e}"
  sizes = spec.validate(case.variables)
  try:
    ifjax.intra_fuse(case.variables, spec, 0.25, groups=[g.name for g in spec.groups if sizes[g.name] <= 128])
    fused = "yes"
  except Exception as e:  # noqa: BLE001
    fused = f"no: {type(e).__name__}"
  try:
    exact_fused = [g.name for g in spec.groups if g.exact and sizes[g.name] <= 128]
    rerr, before, after = cm.resize_error(case, spec, exact_fused)
    smaller = f"{'yes' if rerr < 1e-4 else 'no'} ({rerr:.1e}; params {before:,} -> {after:,})"
  except Exception as e:  # noqa: BLE001
    smaller = f"no: {type(e).__name__}"
  err, control = cm.duplicate_errors(case, spec)
  dup = f"{'yes' if err < 1e-4 else 'no'} ({err:.1e}; control {control:.1e})"
  return f"| {name} | {traced} | {checked} | {fused} | {smaller} | {dup} | {time.perf_counter() - t0:.0f} |"


def main(argv: list[str]) -> None:
  cm = _models()
  print("| model | traced | check_spec | fused | runs smaller with resize (rel. diff. to keep_shapes) | "
        "exact duplicates kept (rel. change) | seconds |")
  print("|---|---|---|---|---|---|---|")
  for name in argv or list(cm.CASES):
    print(row(cm, name), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
