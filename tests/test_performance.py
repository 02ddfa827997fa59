"""Compilation counts and the traced (jit) path of whole-network fusion.

XLA compilations are counted with ``jax.monitoring``: the host path compiles nothing for small groups and one
kernel (in two shapes) for the costs of large ones, whatever their shapes; a repeated call compiles nothing at
all, and ``jax.jit(intra_fuse)`` works with the Sinkhorn solver.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax

_COMPILES = [0]


def _count(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count)


def compiles(fn):
  """(result, number of XLA compilations while running ``fn``)."""
  before = _COMPILES[0]
  out = jax.block_until_ready(fn())
  return out, _COMPILES[0] - before


@pytest.fixture(scope="module")
def resnet20():
  module, spec = ifjax.models.get("resnet20")
  return module, spec, jax.device_get(module.init(jax.random.key(0), jnp.ones((1, 32, 32, 3))))


@pytest.fixture(scope="module")
def vgg():
  module, spec = ifjax.models.get("vgg11_bn")
  return module, spec, jax.device_get(module.init(jax.random.key(0), jnp.ones((1, 32, 32, 3))))


def test_exact_fusion_of_a_small_model_compiles_nothing(resnet20):
  """Every ResNet20 group is small (n * m * d <= 2^22): importance, cost, EMD, maps and the edits all run
  on the host, so even the first call, at a ratio never seen before, compiles no XLA program."""
  _, spec, v = resnet20
  for ratio in (0.37, 0.61):
    out, n = compiles(lambda: ifjax.intra_fuse(v, spec, ratio))
    assert n == 0
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(out))
  pl, n = compiles(lambda: ifjax.plan(v, spec, 0.5, fuse=False))
  assert n == 0 and isinstance(pl["stream1"].keep, np.ndarray)


def test_repeated_calls_compile_nothing(vgg):
  """VGG11-BN's large groups use the compiled cost kernel and Sinkhorn its bucketed programs: a repeated
  call compiles nothing, and a new ratio on a small group (host cost, same Sinkhorn bucket) neither."""
  _, spec, v = vgg
  for solver in ("exact", "sinkhorn"):
    ifjax.intra_fuse(v, spec, 0.5, solver=solver)
    _, again = compiles(lambda: ifjax.intra_fuse(v, spec, 0.5, solver=solver))
    assert again == 0, solver
  _, n = compiles(lambda: ifjax.plan(v, spec, 0.55, solver="sinkhorn", groups=["conv0"]))  # 64 -> 28: bucket 32
  assert n == 0


def test_costs_of_every_shape_share_one_program(vgg):
  """Large groups' costs (NumPy inputs) are (256 x 256) tiles of one compiled kernel in two chunk shapes, whatever
  the group's shape: after VGG11-BN at 0.5, a new ratio and the half-width model compile nothing."""
  from ifjax import _transport

  _, spec, v = vgg
  _transport._tile_kernel.clear_cache()
  half, n = compiles(lambda: ifjax.intra_fuse(v, spec, 0.5))
  assert 1 <= n <= 2
  _, n = compiles(lambda: ifjax.intra_fuse(v, spec, 0.3))
  assert n == 0
  sizes = ifjax.widths(half, spec)
  assert max(sizes.values()) == 256  # its largest groups still go to the kernel (256 * 128 * 4608 > 2^22)
  _, n = compiles(lambda: ifjax.intra_fuse(half, spec, 0.5))
  assert n == 0


def test_jit_intra_fuse_with_sinkhorn(vgg):
  module, spec, v = vgg
  fused = jax.jit(lambda v: ifjax.intra_fuse(v, spec, 0.5, solver="sinkhorn"))
  a = fused(v)
  b = ifjax.intra_fuse(v, spec, 0.5, solver="sinkhorn")
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)
  _, n = compiles(lambda: fused(v))
  assert n == 0  # one program, cached
  small, _ = ifjax.models.get("vgg11_bn", widths=ifjax.widths(a, spec))
  assert small.apply(a, jnp.ones((2, 32, 32, 3))).shape == (2, 10)
  with pytest.raises(ValueError, match="solver='exact' runs POT on the host"):
    jax.jit(lambda v: ifjax.intra_fuse(v, spec, 0.5))(v)


def test_host_and_traced_paths_agree_on_apply_plan(resnet20):
  """apply_plan on NumPy (host) and under jit (XLA) gives the same arrays to float tolerance."""
  _, spec, v = resnet20
  pl = ifjax.plan(v, spec, 0.5)
  host = ifjax.apply_plan(v, spec, pl)
  traced = jax.jit(lambda v, pl: ifjax.apply_plan(v, spec, pl))(v, pl)
  for x, y in zip(jax.tree.leaves(host), jax.tree.leaves(traced)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


_SECOND_PROCESS = """
import sys, jax, jax.numpy as jnp, ifjax
ifjax.enable_compilation_cache(sys.argv[1])
events = []
jax.monitoring.register_event_listener(lambda e, **k: events.append(e))
jax.jit(lambda x: jnp.sin(x) * 2 + x.sum())(jnp.arange(7.0)).block_until_ready()
print(events.count("/jax/compilation_cache/cache_misses"), events.count("/jax/compilation_cache/cache_hits"))
"""


def test_persistent_compilation_cache(tmp_path):
  """A second process with the same cache directory reads the programs back instead of compiling them."""
  import subprocess
  import sys

  def run():
    out = subprocess.run([sys.executable, "-c", _SECOND_PROCESS, str(tmp_path / "xla")], capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    return int(out[-2]), int(out[-1])

  misses, hits = run()
  assert misses >= 1 and hits == 0  # the function (and jnp.arange's program) compiled and written
  assert any((tmp_path / "xla").iterdir())
  assert run() == (0, misses)  # all read back
