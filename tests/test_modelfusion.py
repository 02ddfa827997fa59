"""OT model fusion (OTFusion): permuted copies fuse back exactly, alignment helps real pairs, bad inputs are refused.

The pretrained ResNet20 needs ../shared/data (or IFJAX_DATA) and skips with a message without it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax._spec import Member, flatten, unflatten

MODES = [("weights", True), ("activations", True), ("weights", False), ("activations", False)]


def permute_groups(variables, spec, seed):
  """A copy of ``variables`` with each group's neurons permuted by its own random permutation, on every member
  (segments at their offsets) and on the scale / bias / mean / var of every BN following a producer layer."""
  flat, rng = dict(flatten(variables)), np.random.default_rng(seed)
  sizes = spec.validate(variables)
  for g in spec.groups:
    n = sizes[g.name]
    perm = rng.permutation(n)
    while np.all(perm == np.arange(n)):
      perm = rng.permutation(n)
    members = list(g.members)
    for m in g.producers:
      for b in spec.batchnorms:
        if m.path == f"params/{b.layer}/kernel":
          members += [Member(f"{c}/{b.bn}/{k}", 0, m.offset) for c, k in (
              ("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"))
              if f"{c}/{b.bn}/{k}" in flat]
    for m in members:
      x = np.array(m.neurons_first(flat[m.path]))
      x[m.offset:m.offset + n] = x[m.offset:m.offset + n][perm]
      flat[m.path] = m.restore(jnp.asarray(x))
  return unflatten(flat)


def _max_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _differ(a, b):
  return any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _mlp(seed=0):
  module, spec = ifjax.models.get("mlp")
  x = jax.random.normal(jax.random.key(100), (16, 32))
  return module, spec, module.init(jax.random.key(seed), x), x


def _vgg():
  module, spec = ifjax.models.get("vgg11_bn")
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  v = jax.jit(module.init)(jax.random.key(0), x)
  rng, flat = np.random.default_rng(2), flatten(v)  # non-trivial BN: random scales, shifts and running statistics
  for p, a in flat.items():
    if p.endswith(("/mean", "/bias")) and "/bn" in p:
      flat[p] = jnp.asarray(0.5 * rng.standard_normal(a.shape), jnp.float32)
    elif p.endswith(("/var", "/scale")):
      flat[p] = jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32)
  return module, spec, unflatten(flat), x


def _resnet20():
  path = ifjax.models.checkpoint_path("resnet20")
  if not path.is_file():
    pytest.skip(f"{path} not found: put the shared data there or set IFJAX_DATA (see ../shared/data/README.md)")
  module, spec, v = ifjax.models.pretrained("resnet20")
  return module, spec, v, jax.random.normal(jax.random.key(1), (4, 32, 32, 3))


MODELS = {"mlp": _mlp, "vgg11_bn": _vgg, "resnet20": _resnet20}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
  module, spec, v, x = MODELS[request.param]()
  return module, spec, v, permute_groups(v, spec, seed=1), x, module.apply(v, x, train=False)


def test_permuted_copy_is_the_same_function_with_different_arrays(model):
  module, spec, v, pv, x, ref = model
  assert _max_rel(module.apply(pv, x, train=False), ref) < 1e-5
  fv, fp, sizes = flatten(v), flatten(pv), spec.validate(v)
  for g in spec.groups:  # every group is really permuted: its first producer's segment changed
    m, n = g.producers[0], sizes[g.name]
    seg = lambda f: np.asarray(m.neurons_first(f[m.path])[m.offset:m.offset + n])
    assert not np.array_equal(seg(fv), seg(fp)), g.name


@pytest.mark.parametrize("mode,fold_bn", MODES)
def test_permuted_copy_fuses_back_to_the_original(model, mode, fold_bn):
  module, spec, v, pv, x, ref = model
  fused = ifjax.fuse_models([v, pv], spec, mode=mode, apply_fn=module.apply, batches=x, fold_bn=fold_bn,
                            apply_kwargs={"train": False})
  assert jax.tree.map(jnp.shape, fused) == jax.tree.map(jnp.shape, v)
  assert _max_rel(module.apply(fused, x, train=False), ref) < 1e-5
  if not fold_bn:  # BNs kept: every array, BN statistics included, is the original one
    for p, a in flatten(v).items():
      np.testing.assert_allclose(np.asarray(flatten(fused)[p]), np.asarray(a), rtol=1e-6, atol=1e-6, err_msg=p)


@pytest.mark.parametrize("mode", ["weights", "activations"])
def test_three_models_two_permuted_copies_fuse_back(mode):
  module, spec, v, x = _mlp()
  models = [v, permute_groups(v, spec, seed=1), permute_groups(v, spec, seed=2)]
  out = ifjax.align_models(models, spec, mode=mode, apply_fn=module.apply, batches=[x[:8], x[8:]])
  assert out.maps[0] == {} and sorted(out.order) == sorted(spec.names)
  for maps in out.maps[1:]:
    for a in maps.values():  # exact OT of a permuted copy: a permutation matrix at zero weight-cost
      m = np.asarray(a.map)
      assert set(np.unique(m)) == {0.0, 1.0} and np.all(m.sum(0) == 1) and np.all(m.sum(1) == 1)
      if mode == "weights":
        assert float(a.cost_after) == 0.0 < float(a.cost_before)
  fused = ifjax.fuse_models(models, spec, mode=mode, apply_fn=module.apply, batches=x, weights=[0.5, 0.3, 0.2])
  assert _max_rel(module.apply(fused, x), module.apply(v, x)) < 1e-5


def test_independent_models_alignment_reduces_distance_and_beats_plain_averaging():
  module, spec, v0, x = _mlp(seed=0)
  _, _, v1, _ = _mlp(seed=1)
  out = ifjax.align_models([v0, v1], spec)
  dist = lambda a, b: sum(float(jnp.sum((p - q) ** 2)) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert dist(out.models[1], v0) < 0.9 * dist(v1, v0)
  for a in out.maps[1].values():
    assert float(a.cost_after) < float(a.cost_before)
  fused = ifjax.fuse_models([v0, v1], spec)
  plain = jax.tree.map(lambda a, b: (a + b) / 2, v0, v1)
  assert _max_rel(module.apply(fused, x), module.apply(plain, x)) > 1e-2
  # the anchor's order is kept: fusing with weights (1, 0) gives model 0 back, (0, 1) the aligned model 1
  np.testing.assert_allclose(module.apply(ifjax.fuse_models([v0, v1], spec, weights=[1, 0]), x), module.apply(v0, x),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(module.apply(ifjax.fuse_models([v0, v1], spec, weights=[0, 1]), x), module.apply(v1, x),
                             rtol=1e-5, atol=1e-5)


def test_sinkhorn_recovers_a_permuted_copy_nearly():
  module, spec, v, x = _mlp()
  out = ifjax.align_models([v, permute_groups(v, spec, seed=3)], spec, solver="sinkhorn", epsilon=1e-3)
  for a in out.maps[1].values():
    assert bool(a.converged) and np.all(np.asarray(a.map).max(1) > 0.99)
  fused = ifjax.fuse_models([v, permute_groups(v, spec, seed=3)], spec, solver="sinkhorn", epsilon=1e-3)
  assert _max_rel(module.apply(fused, x), module.apply(v, x)) < 1e-2


def test_dtypes_kept_and_inputs_not_modified():
  module, spec, v, x = _mlp()
  v16 = jax.tree.map(lambda a: np.asarray(a.astype(jnp.bfloat16)), v)  # numpy leaves: in-place edits would show
  p16 = jax.tree.map(np.asarray, permute_groups(v16, spec, seed=1))
  before = jax.tree.map(np.copy, (v16, p16))
  fused = ifjax.fuse_models([v16, p16], spec)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(fused))
  for a, b in zip(jax.tree.leaves((v16, p16)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  assert not _differ(fused, v16)


def test_bad_inputs_are_refused_with_the_problem_named():
  module, spec, v, x = _mlp()
  for bad in ([], [v], v):
    with pytest.raises(ValueError, match="at least 2"):
      ifjax.fuse_models(bad, spec)
  wide = ifjax.models.get("mlp", widths={"dense1": 32})[0].init(jax.random.key(0), x)
  shapes = r"shape \(128, 64\) vs shape \(128, 32\)"
  with pytest.raises(ValueError, match=rf"models 0 and 1 differ at 'params/dense1/kernel': {shapes}"):
    ifjax.fuse_models([v, wide], spec)
  extra = {**v, "params": {**v["params"], "extra": {"kernel": jnp.zeros(3)}}}
  with pytest.raises(ValueError, match="'params/extra/kernel': no such array vs shape"):
    ifjax.fuse_models([v, v, extra], spec)
  for w, msg in (([1.0], "2 numbers"), ([1.5, -0.5], "non-negative"), ([0.5, 0.6], "sum to 1")):
    with pytest.raises(ValueError, match=msg):
      ifjax.fuse_models([v, v], spec, weights=w)
  with pytest.raises(ValueError, match="apply_fn= .* and batches="):
    ifjax.fuse_models([v, v], spec, mode="activations", batches=x)
  with pytest.raises(ValueError, match="apply_fn= .* and batches="):
    ifjax.fuse_models([v, v], spec, mode="activations", apply_fn=module.apply)
  with pytest.raises(ValueError, match="at least one batch"):
    ifjax.fuse_models([v, v], spec, mode="activations", apply_fn=module.apply, batches=[])
  with pytest.raises(ValueError, match="mode must be one of"):
    ifjax.fuse_models([v, v], spec, mode="gradients")
  with pytest.raises(ValueError, match="solver must be one of"):
    ifjax.fuse_models([v, v], spec, solver="greedy")


def test_unfold_bn_gives_the_fused_model_the_aligned_statistics():
  """unfold_bn=True: the same eval-mode function, and for a permuted copy the fused BNs carry exactly the
  original model's (folded) input statistics, so training mode starts from the fused function."""
  from ifjax._batchnorm import input_statistics
  module, spec, v, x = _vgg()
  pv = permute_groups(v, spec, seed=1)
  fused = ifjax.fuse_models([v, pv], spec, unfold_bn=True)
  ref = module.apply(v, x, train=False)
  assert _max_rel(module.apply(fused, x, train=False), ref) < 1e-5
  flat, stats = flatten(fused), input_statistics(v, spec)
  assert stats and all(p in flat for p in stats)
  for p, s in stats.items():
    want = np.square(s) if p.endswith("/var") else s
    np.testing.assert_allclose(np.asarray(flat[p]), want, rtol=1e-5, atol=1e-6, err_msg=p)
