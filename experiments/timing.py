"""Wall-clock of trace_spec, plan and apply_plan on the zoo models (CPU or GPU, whatever JAX sees).

    python experiments/timing.py
"""

import time

import jax
import jax.numpy as jnp

import ifjax

SHAPES = {"vgg11_bn": (1, 32, 32, 3), "resnet18": (1, 32, 32, 3), "resnet50": (1, 224, 224, 3)}


def timed(fn):
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t


def main():
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| model | groups | trace_spec (s) | plan, all groups, ratio 0.5, exact (s) | apply_plan (s) | params before -> after |")
  print("|---|---|---|---|---|---|")
  for name, shape in SHAPES.items():
    module, spec = ifjax.models.get(name, num_classes=1000 if name == "resnet50" else 10)
    x = jnp.ones(shape)
    v = jax.jit(module.init)(jax.random.key(0), x)
    _, t_trace = timed(lambda: ifjax.trace_spec(module.apply, v, x))
    pl, t_plan = timed(lambda: ifjax.plan(v, spec, 0.5))
    small, t_apply = timed(lambda: ifjax.apply_plan(v, spec, pl))
    count = lambda t: sum(a.size for a in jax.tree.leaves(t["params"]))
    print(f"| {name} | {len(spec.groups)} | {t_trace:.2f} | {t_plan:.1f} | {t_apply:.2f} | "
          f"{count(v):,} -> {count(small):,} |")


if __name__ == "__main__":
  main()
