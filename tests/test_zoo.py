"""Model zoo: shapes, the paper's group numbering, BN folding, widths, traced == hand specs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax

SHAPES = {"mlp": (2, 8, 8, 1), "vgg11_bn": (2, 32, 32, 3), "resnet18": (2, 32, 32, 3), "resnet50": (1, 32, 32, 3),
          "resnet20": (2, 32, 32, 3), "lenet5": (2, 28, 28, 1)}
_CACHE = {}


def _model(name):
  """(module, spec, randomized variables, input): weights and BN statistics random, so checks have teeth."""
  if name not in _CACHE:
    module, spec = ifjax.models.get(name)
    x = jnp.asarray(np.random.default_rng(1).normal(size=SHAPES[name]), jnp.float32)
    v = jax.jit(module.init)(jax.random.key(0), x)
    rng = np.random.default_rng(0)
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.1 + (a if a.ndim == 1 else 0), a.dtype), v)
    if "batch_stats" in v:
      v["batch_stats"] = {bn: {"mean": jnp.asarray(rng.normal(size=s["mean"].shape) * 0.05, jnp.float32),
                               "var": jnp.asarray(0.5 + rng.uniform(size=s["var"].shape), jnp.float32)}
                          for bn, s in _bn_stats(v["batch_stats"]).items()}
      v["batch_stats"] = _nest(v["batch_stats"])
    # the network must be alive: the stem's weights reach the output
    stem = spec.groups[0].producers[0].path
    dead = ifjax._spec.unflatten({**ifjax._spec.flatten(v), stem: jnp.zeros_like(ifjax._spec.flatten(v)[stem])})
    assert np.max(np.abs(module.apply(dead, x) - module.apply(v, x))) > 1e-3
    _CACHE[name] = (module, spec, v, x)
  return _CACHE[name]


def _bn_stats(stats):
  flat = ifjax._spec.flatten(stats)
  return {p.rsplit("/", 1)[0]: {"mean": flat[p.rsplit("/", 1)[0] + "/mean"], "var": flat[p]}
          for p in flat if p.endswith("/var")}


def _nest(by_module):
  return ifjax._spec.unflatten({f"{m}/{k}": a for m, s in by_module.items() for k, a in s.items()})


def _modules(members):
  return {m.path.split("/", 1)[1].rsplit("/", 1)[0] for m in members if m.path.endswith("/kernel")}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_init_apply_and_validate(name):
  module, spec, v, x = _model(name)
  assert module.apply(v, x, train=False).shape == (x.shape[0], 10)
  sizes = spec.validate(v)
  assert sizes == ifjax.widths(v, spec) and len(sizes) == len(spec.groups)


def test_vgg11_bn_numbering_matches_the_paper():
  _, spec, _, _ = _model("vgg11_bn")
  widths = [512, 512, 512, 512, 256, 256, 128, 64]
  for k in range(8):
    conv = 7 - k
    g = spec[k]
    assert _modules(g.producers) == {f"conv{conv}"}
    assert _modules(g.consumers) == ({"fc"} if k == 0 else {f"conv{conv + 1}"})
    assert spec.validate(_model("vgg11_bn")[2])[g.name] == widths[k]
  assert ("conv3", "bn3") in [tuple(b[:2]) for b in spec.batchnorms]


# digest §1.10, ResNet18 table: group -> (producers, consumers); "." in the paper = "_" / "/" here
RESNET18_TABLE = {
    0: ({"layer4_1/conv2", "layer4_0/shortcut_conv", "layer4_0/conv2"}, {"fc", "layer4_1/conv1"}),
    1: ({"layer4_1/conv1"}, {"layer4_1/conv2"}),
    2: ({"layer4_0/conv1"}, {"layer4_0/conv2"}),
    3: ({"layer3_1/conv2", "layer3_0/shortcut_conv", "layer3_0/conv2"},
        {"layer4_0/shortcut_conv", "layer4_0/conv1", "layer3_1/conv1"}),
    4: ({"layer3_1/conv1"}, {"layer3_1/conv2"}),
    5: ({"layer3_0/conv1"}, {"layer3_0/conv2"}),
    6: ({"layer2_1/conv2", "layer2_0/shortcut_conv", "layer2_0/conv2"},
        {"layer3_0/shortcut_conv", "layer3_0/conv1", "layer2_1/conv1"}),
    7: ({"layer2_1/conv1"}, {"layer2_1/conv2"}),
    8: ({"layer2_0/conv1"}, {"layer2_0/conv2"}),
    9: ({"layer1_1/conv2", "stem_conv", "layer1_0/conv2"},
        {"layer2_0/shortcut_conv", "layer2_0/conv1", "layer1_1/conv1", "layer1_0/conv1"}),
    10: ({"layer1_1/conv1"}, {"layer1_1/conv2"}),
    11: ({"layer1_0/conv1"}, {"layer1_0/conv2"}),
}


def test_resnet18_numbering_matches_the_paper():
  _, spec, v, _ = _model("resnet18")
  assert len(spec.groups) == 12
  sizes = spec.validate(v)
  for k, (prod, cons) in RESNET18_TABLE.items():
    assert (_modules(spec[k].producers), _modules(spec[k].consumers)) == (prod, cons), k
    assert sizes[spec[k].name] == [512, 256, 128, 64][k // 3]
  # every producer conv has its bias in the group (kuangliu: bias=True everywhere)
  assert all(any(m.path.endswith("/bias") for m in g.producers) for g in spec.groups)


def test_resnet50_numbering():
  _, spec, v, _ = _model("resnet50")
  sizes = spec.validate(v)
  assert len(spec.groups) == 1 + 2 * 16 + 4
  expect = {0: "stream4", 1: "layer4_2/conv2", 2: "layer4_2/conv1", 6: "layer4_0/conv1", 7: "stream3",
            8: "layer3_5/conv2", 16: "layer3_1/conv2", 19: "layer3_0/conv1", 20: "stream2", 36: "stem_conv"}
  assert {k: spec[k].name for k in expect} == expect
  assert sizes["stream4"] == 2048 and sizes["stream3"] == 1024
  assert _modules(spec["stream3"].producers) == {"layer3_0/downsample_conv"} | {f"layer3_{b}/conv3" for b in range(6)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_bn_folding_preserves_outputs(name):
  module, spec, v, x = _model(name)
  folded = ifjax.fold_batchnorm(v, spec)
  np.testing.assert_allclose(module.apply(folded, x), module.apply(v, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mlp", "vgg11_bn", "resnet18", "resnet20", "lenet5"])
def test_hand_spec_passes_check_spec(name):
  module, spec, v, x = _model(name)
  ifjax.check_spec(module.apply, v, spec, x, scaling=True, rtol=1e-3)


def test_check_spec_catches_a_broken_resnet_stream():
  module, spec, v, x = _model("resnet18")
  g = spec["stream2"]
  broken = ifjax.Spec(tuple(ifjax.Group(g.name, [m for m in g.producers if "shortcut" not in m.path], g.consumers)
                            if h.name == g.name else h for h in spec.groups), spec.batchnorms)
  with pytest.raises(ifjax.SpecCheckError, match="stream2"):
    ifjax.check_spec(module.apply, v, broken, x)


def test_widths_round_trip_and_errors():
  module, spec = ifjax.models.get("resnet18", widths={"stream2": 64, "layer3_0/conv1": 100})
  v = module.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
  w = spec.validate(v)
  assert w["stream2"] == 64 and w["layer3_0/conv1"] == 100 and w["stream3"] == 256
  with pytest.raises(ValueError, match="unknown groups"):
    ifjax.models.get("resnet18", widths={"stream9": 3})
  with pytest.raises(ValueError, match="unknown model"):
    ifjax.models.get("resnet1000")


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_pruned_variables_run_at_their_widths(name):
  module, spec, v, x = _model(name)
  small = ifjax.intra_fuse(v, spec, 0.5, groups=[0, 3, len(spec.groups) - 1])
  module_small, _ = ifjax.models.get(name, widths=ifjax.widths(small, spec))
  assert module_small.apply(small, x, train=False).shape == (x.shape[0], 10)
  assert ifjax.widths(small, spec)[spec[0].name] == ifjax.widths(v, spec)[spec[0].name] // 2


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_trace_spec_reproduces_the_hand_spec(name):
  module, spec, v, x = _model(name)
  traced = ifjax.trace_spec(module.apply, v, x, train=False)
  assert [sorted(g.members) for g in traced.groups] == [sorted(g.members) for g in spec.groups]
  assert set(traced.batchnorms) == set(spec.batchnorms)


@pytest.mark.parametrize("name", ["mlp", "vgg11_bn", "resnet18", "resnet20", "lenet5"])
def test_intra_fuse_with_traced_spec_is_bit_identical(name):
  module, spec, v, x = _model(name)
  traced = ifjax.trace_spec(module.apply, v, x, train=False)
  sel = list(range(min(3, len(spec.groups))))  # paper indices: the same groups in both specs
  a = ifjax.intra_fuse(v, spec, 0.3, groups=sel)
  b = ifjax.intra_fuse(v, traced, 0.3, groups=sel)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_option_a_streams_are_traced_as_segments():
  """The option-A pad makes stage k's stream channel c stage k+1's channel c + pad: the tracer splits the
  wider stages' streams into the carried segment and the two padding segments (what the hand spec says)."""
  module, spec, v, x = _model("resnet20")
  traced = ifjax.trace_spec(module.apply, v, x, train=False)
  assert traced.names[-5:] == ["stem_conv", "layer2_0/conv2[0:8]", "layer2_0/conv2[24:32]", "layer3_0/conv2[0:16]",
                               "layer3_0/conv2[48:64]"]
  assert [g.size for g in traced.groups[-5:]] == [16, 8, 8, 16, 16]
  stream1 = traced.groups[-5]
  assert ("params/layer3_2/conv2/kernel", 3, 24) in stream1.producers
  assert ("params/fc/kernel", 0, 24) in stream1.consumers
  with pytest.raises(ValueError, match="size"):  # a segment group without its size is ambiguous
    ifjax.Spec(tuple(dataclasses.replace(g, size=None) for g in spec.groups)).validate(v)


@pytest.mark.parametrize("name", ["resnet20", "lenet5"])
@pytest.mark.parametrize("fuse", [False, True])
def test_zero_padded_plan_computes_the_pruned_model(name, fuse):
  """apply_plan(keep_shapes=True) = the reduced model at its widths, including the option-A segments."""
  module, spec, v, x = _model(name)
  pl = ifjax.plan(v, spec, 0.5, fuse=fuse)
  small = ifjax.apply_plan(v, spec, pl)
  padded = ifjax.apply_plan(v, spec, pl, keep_shapes=True)
  assert jax.tree.map(jnp.shape, padded) == jax.tree.map(jnp.shape, v)
  module_small, spec_small = ifjax.models.get(name, widths=ifjax.widths(v, spec, pl))
  spec_small.validate(small)
  want = module_small.apply(small, x, train=False)
  np.testing.assert_allclose(module.apply(padded, x, train=False), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_recalibrated_batchnorm_reproduces_train_mode():
  """With no group pruned, re-estimating the BNs of the folded model on a batch gives, in eval mode, exactly
  the original model in train mode on that batch (same statistics, same |gamma| and beta)."""
  module, spec, v, x = _model("resnet20")
  folded = ifjax.apply_plan(v, spec, {})
  fixed = ifjax.recalibrate_batchnorm(module.apply, folded, v, spec, {}, [x])
  want, _ = module.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(module.apply(fixed, x, train=False), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_recalibrated_batchnorm_takes_the_kept_neurons_affine():
  module, spec, v, x = _model("resnet20")
  pl = ifjax.plan(v, spec, 0.5, groups=["layer1_0/conv1", "stream2a"], fuse=False)
  small, _ = ifjax.models.get("resnet20", widths=ifjax.widths(v, spec, pl))
  fixed = ifjax.recalibrate_batchnorm(small.apply, ifjax.apply_plan(v, spec, pl), v, spec, pl, [x])
  keep = np.asarray(pl["layer1_0/conv1"].keep)
  got = fixed["params"]["layer1_0"]["bn1"]
  np.testing.assert_allclose(got["scale"], np.abs(v["params"]["layer1_0"]["bn1"]["scale"])[keep], rtol=1e-6)
  np.testing.assert_allclose(got["bias"], v["params"]["layer1_0"]["bn1"]["bias"][keep], rtol=1e-6)
  keep2 = np.asarray(pl["stream2a"].keep)  # stream2a = channels 0..7 of stage 2's stream: bn2 of every block there
  got2, dense2 = fixed["params"]["layer2_1"]["bn2"]["bias"], v["params"]["layer2_1"]["bn2"]["bias"]
  np.testing.assert_allclose(got2[:4], dense2[keep2])
  np.testing.assert_allclose(got2[4:], dense2[8:])
  assert np.all(np.isfinite(np.asarray(small.apply(fixed, x))))
  with pytest.raises(ValueError, match="cluster_centroid"):
    ifjax.recalibrate_batchnorm(small.apply, fixed, v, spec,
                                ifjax.plan(v, spec, 0.5, groups=[0], target="cluster_centroid"), [x])
