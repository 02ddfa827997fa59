"""A plan gives the pruned widths and spec (zoo and traced models), save(plan=) round-trips, allocate counts the
FLOPs of a traced model through resize, and every ifjax error derives from IfjaxError."""

import inspect
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax


class Net(nn.Module):
  """conv0 + bn0 -> conv1 + bn1, both concatenated into conv2 (segment groups with size=), flattened into a Dense."""

  widths: tuple = (8, 8, 12)

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    a = nn.relu(bn("bn0")(nn.Conv(self.widths[0], (3, 3), name="conv0")(x)))
    b = nn.relu(bn("bn1")(nn.Conv(self.widths[1], (3, 3), name="conv1")(a)))
    c = nn.relu(nn.Conv(self.widths[2], (3, 3), name="conv2")(jnp.concatenate([a, b], -1)))
    return nn.Dense(3, name="out")(c.reshape(c.shape[0], -1))


def _rebuild(w):
  return Net((w["conv0"], w["conv1"], w["conv2"])).apply


@pytest.fixture(scope="module")
def traced():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
  v = Net().init(jax.random.key(0), x)
  r = np.random.default_rng(1)  # non-trivial BN statistics, so folding matters
  v = {"params": v["params"],
       "batch_stats": jax.tree.map(lambda a: jnp.asarray(r.uniform(0.5, 1.5, a.shape), a.dtype), v["batch_stats"])}
  return v, ifjax.trace_spec(Net().apply, v, x), x


@pytest.fixture(scope="module")
def resnet20():
  module, spec = ifjax.models.get("resnet20")
  v = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  ratio = {g.name: (0.5, 0.25, 0.0, 0.3)[i % 4] for i, g in enumerate(spec.groups)}  # segment groups at other ratios
  pl = ifjax.plan(v, spec, ratio, fuse=False)
  return v, spec, pl, ifjax.apply_plan(v, spec, pl)


# -- 1. plan.widths(), plan.spec(), widths(pruned, spec, plan), save(plan=) ----------------------------------
def test_zoo_plan_spec_is_the_rebuilt_spec(resnet20):
  v, spec, pl, small = resnet20
  assert isinstance(pl, ifjax.Plan) and isinstance(pl, dict)
  w = pl.widths()
  assert w["stream1"] != ifjax.widths(v, spec)["stream1"]
  assert pl.spec() == ifjax.models.get("resnet20", widths=w)[1]
  assert pl.spec().validate(small) == w
  # widths() with a plan takes the pruned variables as well as the original ones
  assert ifjax.widths(small, spec, pl) == ifjax.widths(v, spec, pl) == w


def test_zoo_save_with_plan_round_trips(resnet20, tmp_path):
  v, spec, pl, small = resnet20
  ifjax.save(tmp_path / "ck", small, spec, plan=pl)
  variables, restored, widths, _ = ifjax.restore(tmp_path / "ck")
  assert restored == pl.spec() and widths == pl.widths()
  assert restored.validate(variables) == widths
  # the restored model runs at its pruned shapes, and can be pruned again with the restored spec
  module = ifjax.models.get("resnet20", widths=widths)[0]
  out = module.apply(variables, jnp.zeros((1, 32, 32, 3)))
  assert out.shape == (1, 10)
  again = ifjax.plan(variables, restored, 0.5, groups="stream1", fuse=False)
  assert again.spec().validate(ifjax.apply_plan(variables, restored, again)) == again.widths()


def test_traced_plan_spec_describes_the_pruned_model(traced, tmp_path):
  v, spec, x = traced
  assert spec["conv0"].size == 8 and spec["conv1"].consumers[0].offset == 8  # segments of conv2's input axis
  pl = ifjax.plan(v, spec, {"conv0": 0.5, "conv1": 0.25, "conv2": 0.5})
  small = ifjax.apply_plan(v, spec, pl)
  assert pl.widths() == {"conv0": 4, "conv1": 6, "conv2": 6}
  pruned = pl.spec()
  assert pruned["conv0"].size == 4 and pruned["conv1"].size == 6 and pruned["conv1"].consumers[0].offset == 4
  assert pruned.validate(small) == pl.widths() == ifjax.widths(small, spec, pl)
  # the spec traced from the pruned model (the rebuilt module) has the same groups, members and sizes
  rebuilt = ifjax.trace_spec(_rebuild(pl.widths()), small, x)
  names = ifjax.match_groups(pruned, rebuilt, small)
  assert {names[g.name]: g.size for g in pruned.groups} == {g.name: g.size for g in rebuilt.groups}
  assert rebuilt.batchnorms == pruned.batchnorms
  # save with plan= and restore: the restored spec validates, and prunes further
  ifjax.save(tmp_path / "ck", small, spec, plan=pl)
  variables, restored, widths, _ = ifjax.restore(tmp_path / "ck")
  assert restored == pruned and widths == pl.widths() and restored.validate(variables) == widths
  np.testing.assert_allclose(_rebuild(widths)(variables, x), _rebuild(widths)(small, x), rtol=1e-6)
  assert ifjax.widths(ifjax.intra_fuse(variables, restored, 0.5), restored, ifjax.plan(variables, restored, 0.5)) \
      == {"conv0": 2, "conv1": 3, "conv2": 3}


def test_plan_is_a_pytree_under_jit(traced):
  v, spec, _ = traced
  pl = jax.jit(lambda v: ifjax.plan(v, spec, 0.5, solver="sinkhorn"))(v)
  assert isinstance(pl, ifjax.Plan) and pl.widths() == {"conv0": 4, "conv1": 4, "conv2": 6}
  assert pl.spec().validate(ifjax.apply_plan(v, spec, pl)) == pl.widths()
  mapped = jax.tree.map(lambda a: a, pl)
  assert isinstance(mapped, ifjax.Plan) and mapped.spec() == pl.spec() and list(mapped) == list(pl)


def test_widths_says_what_it_wants(traced):
  v, spec, _ = traced
  pl = ifjax.plan(v, spec, 0.5, fuse=False)
  other = ifjax.prune(v, spec, 0.25)  # neither the plan's variables nor its pruned ones
  with pytest.raises(ValueError, match=r"neither the ones the plan was made for .*nor the pruned ones "
                                       r"apply_plan\(variables, spec, plan\) returns .*plan\.widths\(\)"):
    ifjax.widths(other, spec, pl)
  hand = {k: gp for k, gp in pl.items()}  # a plain dict: widths() still works, Plan's methods are not there
  assert ifjax.widths(ifjax.apply_plan(v, spec, hand), spec, hand) == pl.widths()
  with pytest.raises(ValueError, match="built by hand"):
    ifjax.Plan(hand).spec()


def test_save_with_plan_wants_the_pruned_variables(traced, tmp_path):
  v, spec, _ = traced
  pl = ifjax.plan(v, spec, 0.5, fuse=False)
  with pytest.raises(ValueError, match="the variables are the ones the plan was made for; pass the pruned ones"):
    ifjax.save(tmp_path / "a", v, spec, plan=pl)
  small = ifjax.apply_plan(v, spec, pl)
  ifjax.save(tmp_path / "b", small, pl.spec(), plan=pl)  # the pruned spec itself is accepted too
  assert ifjax.restore(tmp_path / "b")[1] == pl.spec()
  assert not (tmp_path / "a").exists()


# -- 2. allocate(target_flops=) of a traced model without a rebuild ------------------------------------------
def test_allocate_flops_of_a_traced_model_without_rebuild(traced):
  v, spec, x = traced
  kw = dict(target_flops=0.6, example_args=(x,), example_kwargs={"train": False})
  alloc = ifjax.allocate(v, spec, apply_fn=Net().apply, **kw)
  assert alloc.cost <= alloc.target == pytest.approx(0.6 * alloc.dense_cost)
  assert alloc.dense_cost == pytest.approx(ifjax.flops(Net().apply, v, x, train=False), rel=1e-3)
  explicit = ifjax.allocate(v, spec, rebuild=_rebuild, **kw)
  assert alloc.kept == explicit.kept
  assert alloc.cost == pytest.approx(explicit.cost, rel=1e-3)
  small = ifjax.prune(v, spec, alloc.ratios)
  assert ifjax.widths(small, spec) == {**ifjax.widths(v, spec), **alloc.kept}
  assert ifjax.flops(_rebuild(alloc.kept), small, x, train=False) <= alloc.target * (1 + 1e-3)
  with pytest.raises(ValueError, match="needs rebuild=.*or apply_fn="):
    ifjax.allocate(v, spec, target_flops=0.6, example_args=(x,))


# -- 3. errors ------------------------------------------------------------------------------------------------
def _ifjax_exception_classes():
  import ifjax.calibration
  import ifjax.cli  # (CliError)
  import ifjax.data
  import ifjax.split_data
  import ifjax.train  # noqa: F401  (every module with exceptions, whatever ran before)
  seen, out = set(), []
  modules = [m for name, m in __import__("sys").modules.items() if name == "ifjax" or name.startswith("ifjax.")]
  for m in modules:
    for _, obj in inspect.getmembers(m, inspect.isclass):
      if (issubclass(obj, BaseException) and obj.__module__.startswith("ifjax") and obj not in seen
          and not issubclass(obj, Warning)):
        seen.add(obj)
        out.append(obj)
  return out


def test_every_ifjax_exception_derives_from_ifjax_error():
  classes = {c.__name__: c for c in _ifjax_exception_classes()}
  assert {"CheckpointError", "CheckpointMismatchError", "SaveFormatError", "ConvergenceError", "SpecCheckError",
          "UnsupportedPrimitiveError", "ResizeError", "TrainingError", "SplitDataError", "DataMissingError",
          "ArgumentTypeError"} <= set(classes)
  missing = sorted(n for n, c in classes.items() if not issubclass(c, ifjax.IfjaxError) and n != "CliError")
  assert not missing
  # and still from the builtins they derived from
  for cls, builtin in [(ifjax.SaveFormatError, ValueError), (ifjax.CheckpointError, ValueError),
                       (ifjax.ConvergenceError, RuntimeError), (ifjax.UnsupportedPrimitiveError, NotImplementedError),
                       (ifjax.ResizeError, ValueError), (ifjax.SpecCheckError, ValueError),
                       (ifjax.data.DataMissingError, FileNotFoundError), (ifjax.ArgumentTypeError, TypeError),
                       (ifjax.ArgumentTypeError, ValueError)]:
    assert issubclass(cls, builtin)
  assert ifjax.SaveFormatError.__module__ == "ifjax._save" and "SaveFormatError" in ifjax.__all__


@pytest.mark.parametrize("call, match", [
    (lambda v, s: ifjax.plan([v], s, 0.5), "variables must be a Flax variables dict"),
    (lambda v, s: ifjax.intra_fuse(v, "spec", 0.5), "spec must be an ifjax.Spec"),
    (lambda v, s: ifjax.prune(v, s, "0.5"), "ratio must be a number"),
    (lambda v, s: ifjax.prune(v, s, {"h0": "0.5"}), "ratio for group 'h0' must be a number"),
    (lambda v, s: ifjax.intra_fuse(v, s, 0.5, importance=3), "importance must be a name, a callable"),
    (lambda v, s: ifjax.plan(v, s, 0.5, fuse="no"), "fuse must be a bool"),
    (lambda v, s: ifjax.plan(v, s, 0.5, solver=None), "solver must be a str"),
    (lambda v, s: ifjax.plan(v, s, 0.5, p="2"), "p must be a number"),
    (lambda v, s: ifjax.apply_plan(v, s, [1]), "plan must be a dict"),
    (lambda v, s: ifjax.allocate(v, s.groups, target_params=0.5), "spec must be an ifjax.Spec"),
    (lambda v, s: ifjax.allocate(v, s, target_flops=0.5, rebuild=3), "rebuild must be callable"),
    (lambda v, s: ifjax.save("/tmp/never-written", v, s, widths=[4]), "widths must be a dict"),
    (lambda v, s: ifjax.save("/tmp/never-written", v, "spec"), "spec must be an ifjax.Spec"),
])
def test_wrong_types_raise_type_error(call, match):
  v = {"params": {"fc0": {"kernel": np.ones((3, 4), np.float32)}, "fc1": {"kernel": np.ones((4, 2), np.float32)}}}
  s = ifjax.Spec([ifjax.Group("h0", [("params/fc0/kernel", 1)], [("params/fc1/kernel", 0)])])
  with pytest.raises(TypeError, match=match) as e:
    call(v, s)
  assert isinstance(e.value, ifjax.IfjaxError) and isinstance(e.value, ValueError)  # what these raised before


def test_no_warning_on_plain_use(traced):
  v, spec, _ = traced
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert ifjax.plan(v, spec, 0.5).widths() == {"conv0": 4, "conv1": 4, "conv2": 6}
