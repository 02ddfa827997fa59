"""ifjax.train: steps, meshes, multi-process, fit / resume, evaluate, augmentation, bad input."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ifjax
from ifjax import train

SCRIPT = Path(__file__).with_name("multidevice.py")


def _run(*args, devices: int | None = None, timeout: int = 240):
  env = dict(os.environ)
  if devices:
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout: int = 240):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("mesh") / "mesh.npz"
  _wait(_run("mesh", out, devices=4))
  return np.load(out)


def _pairs(results, prefix):
  keys = [k for k in results.files if k.startswith(prefix + "_ref")]
  assert keys
  return [(k, results[k], results[k.replace("_ref", "_got", 1)]) for k in keys]


def test_data_parallel_step_equals_single_device(mesh_results):
  assert int(mesh_results["dp_devices"]) == 4  # the state really lives on 4 devices
  for k, ref, got in _pairs(mesh_results, "dp"):
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6, err_msg=k)
  ref_loss, got_loss = mesh_results["dp_loss"]
  assert abs(ref_loss - got_loss) < 1e-5


def test_two_models_on_a_mesh_equal_sequential_training(mesh_results):
  assert int(mesh_results["mm_devices"][0]) == 4
  for i in range(2):
    for k, ref, got in _pairs(mesh_results, f"mm{i}"):
      np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6, err_msg=k)
  # the two models stayed different (no traffic between them)
  assert not np.allclose(mesh_results["mm0_ref.params['fc']['kernel']"], mesh_results["mm1_ref.params['fc']['kernel']"])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_process_distributed_step_equals_single_process(tmp_path):
  port = _free_port()
  procs = [_run("process", tmp_path / "proc.npz", i, port) for i in range(2)]
  single = _run("single", tmp_path / "single.npz")
  for p in procs + [single]:
    _wait(p)
  a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "proc.npz")
  assert set(a.files) == set(b.files) and len(a.files) > 5
  for k in a.files:
    np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=2e-6, err_msg=k)


# -- single-process tests --------------------------------------------------------------------------------
class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
    return nn.Dense(3, name="fc")(x.mean(axis=(1, 2)))


def _toy(n=96, seed=0):
  """3 classes told apart by the mean colour of the image: learnable in a few epochs."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n).astype(np.int32)
  images = rng.normal(size=(n, 6, 6, 3)).astype(np.float32) * 0.5
  images[np.arange(n), :, :, labels] += 1.5
  return images, labels


@pytest.fixture(scope="module")
def tiny():
  module = TinyCNN()
  return module, module.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))


def test_fit_learns_and_updates_batch_stats(tiny):
  module, variables = tiny
  data = _toy()
  before = train.evaluate(module, variables, data)
  out, history = train.fit(module, variables, data, epochs=6, optimizer=optax.sgd(0.1, momentum=0.9), batch_size=16,
                           eval_data=data, progress=False)
  assert [h["epoch"] for h in history] == list(range(1, 7))
  assert history[-1]["loss"] < history[0]["loss"]
  assert history[-1]["eval_accuracy"] > 0.9 > before
  assert train.evaluate(module, out, data) == history[-1]["eval_accuracy"]
  assert not np.allclose(out["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
  # inputs are not modified
  assert np.array_equal(variables["params"]["fc"]["kernel"], tiny[1]["params"]["fc"]["kernel"])


def test_fit_is_deterministic_and_resumes_exactly(tiny, tmp_path):
  pytest.importorskip("orbax.checkpoint")
  module, variables = tiny
  data = _toy()
  kw = dict(optimizer=train.paper_sgd("train", 6), batch_size=16, progress=False, augment=train.flip_crop(1))
  full, hist_full = train.fit(module, variables, data, epochs=3, **kw)
  again, _ = train.fit(module, variables, data, epochs=3, **kw)
  # interrupted after 2 epochs, then resumed to 3
  train.fit(module, variables, data, epochs=2, checkpoint_dir=tmp_path, **kw)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("epoch_")) == ["epoch_1", "epoch_2"]
  resumed, hist_resumed = train.fit(module, variables, data, epochs=3, checkpoint_dir=tmp_path, **kw)
  for a, b, c in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(again),
                     jax.tree_util.tree_leaves(resumed)):
    assert np.array_equal(a, b) and np.array_equal(a, c)
  assert [h["loss"] for h in hist_resumed] == [h["loss"] for h in hist_full]
  # a run with other settings refuses the checkpoint instead of mixing runs
  with pytest.raises(train.TrainingError, match="batch_size"):
    train.fit(module, variables, data, epochs=4, checkpoint_dir=tmp_path, **{**kw, "batch_size": 8})


def test_fit_time_limit_and_checkpoint_every(tiny, tmp_path):
  pytest.importorskip("orbax.checkpoint")
  module, variables = tiny
  data = _toy()
  kw = dict(optimizer=train.paper_sgd("train", 6), batch_size=16, progress=False)
  full, _ = train.fit(module, variables, data, epochs=3, **kw)
  # a tiny allowance stops after the first epoch, saving it although it is not a multiple of checkpoint_every
  with pytest.warns(UserWarning, match="time_limit"):
    _, hist = train.fit(module, variables, data, epochs=3, checkpoint_dir=tmp_path, checkpoint_every=2,
                        time_limit=1e-9, **kw)
  assert [h["epoch"] for h in hist] == [1]
  resumed, hist = train.fit(module, variables, data, epochs=3, checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
  assert [h["epoch"] for h in hist] == [1, 2, 3]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("epoch_")) == ["epoch_1", "epoch_2", "epoch_3"]
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)))
  with pytest.raises(train.TrainingError, match="checkpoint_every"):
    train.fit(module, variables, data, epochs=1, checkpoint_every=0, **kw)
  with pytest.raises(train.TrainingError, match="time_limit"):
    train.fit(module, variables, data, epochs=1, time_limit=0, **kw)


def test_fit_many_equals_separate_fits(tiny):
  module, variables = tiny
  other = module.init(jax.random.key(1), jnp.zeros((1, 6, 6, 3)))
  d0, d1 = _toy(48, 0), _toy(48, 1)
  opt = optax.sgd(0.05, momentum=0.9)
  (m0, m1), hist = train.fit_many(module, [variables, other], [d0, d1], epochs=2, optimizer=opt, batch_size=16,
                                  progress=False, eval_data=d0)
  assert len(hist[0]["loss"]) == 2 and len(hist[0]["eval_accuracy"]) == 2
  # model i uses seed + i for its shuffling and split(key, 2)[i] for its step keys; without augmentation the
  # keys do not matter, so each equals a plain fit with seed i
  s0, _ = train.fit(module, variables, d0, epochs=2, optimizer=opt, batch_size=16, progress=False, seed=0)
  s1, _ = train.fit(module, other, d1, epochs=2, optimizer=opt, batch_size=16, progress=False, seed=1)
  for a, b in ((m0, s0), (m1, s1)):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_evaluate_pads_the_last_batch(tiny):
  module, variables = tiny
  images, labels = _toy(37)
  pred = np.argmax(module.apply(variables, images), -1)
  expected = float(np.mean(pred == labels))
  assert train.evaluate(module, variables, (images, labels), batch_size=10) == pytest.approx(expected)
  batches = [(images[i:i + 7], labels[i:i + 7]) for i in range(0, 37, 7)]
  assert train.evaluate(module, variables, batches, batch_size=8) == pytest.approx(expected)


def test_flip_crop():
  key = jax.random.key(0)
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  flipped = train.flip_crop(pad=0)(key, x)  # no crop: every image is itself or its mirror
  for a, b in zip(np.asarray(flipped), np.asarray(x)):
    assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
  big = jnp.ones((64, 4, 4, 1))
  out = np.asarray(train.flip_crop(pad=2, fill=-3.0)(key, big))
  assert set(np.unique(out)) <= {1.0, -3.0} and (out == -3.0).any() and (out == 1.0).all(axis=(1, 2, 3)).any()
  assert out.shape == big.shape


def test_paper_sgd_learning_rates():
  opt = train.paper_sgd("finetune", steps_per_epoch=2)
  params = {"w": jnp.ones(())}
  state = opt.init(params)
  lrs = []
  for _ in range(122):
    updates, state = opt.update({"w": jnp.ones(())}, state, params)
    lrs.append(float(updates["w"]))
  # momentum 0.9 with a unit gradient: the first update is -lr, and lr halves at epoch 30 (step 60)
  assert lrs[0] == pytest.approx(-0.01)
  trace_59 = sum(0.9 ** i for i in range(60))
  assert lrs[59] == pytest.approx(-0.01 * trace_59, rel=1e-5)
  assert lrs[60] == pytest.approx(-0.005 * (trace_59 * 0.9 + 1), rel=1e-5)
  with pytest.raises(train.TrainingError, match="phase"):
    train.paper_sgd("pretrain")


def test_bad_input(tiny):
  module, variables = tiny
  opt = optax.sgd(0.1)
  empty = (np.zeros((0, 6, 6, 3), np.float32), np.zeros((0,), np.int32))
  with pytest.raises(train.TrainingError, match="empty"):
    train.fit(module, variables, empty, epochs=1, optimizer=opt, progress=False)
  with pytest.raises(train.TrainingError, match="fewer than one batch"):
    train.fit(module, variables, _toy(10), epochs=1, optimizer=opt, batch_size=16, progress=False)
  with pytest.raises(train.TrainingError, match="labels"):
    train.fit(module, variables, (_toy(20)[0], _toy(19)[1]), epochs=1, optimizer=opt, progress=False)
  with pytest.raises(train.TrainingError, match="needs 8 devices, but 1"):
    train.make_mesh({"models": 2, "data": 4})
  with pytest.raises(train.TrainingError, match="xla_force_host_platform_device_count"):
    train.make_mesh({"data": 2})
  mesh = train.make_mesh({"data": 1})
  with pytest.raises(train.TrainingError, match="not \\['models'\\]"):
    train.make_step(module, opt, mesh, model_axis="models")
  with pytest.raises(train.TrainingError, match="evaluate: the data has no examples"):
    train.evaluate(module, variables, empty)
  with pytest.raises(train.TrainingError, match="Flax variables"):
    train.init_state(module, {"kernel": 1}, opt)
  with pytest.raises(train.TrainingError, match="optimizer"):
    train.fit(module, variables, _toy(), epochs=1, optimizer="sgd", batch_size=16, progress=False)


def test_fit_accepts_batch_callables(tiny):
  module, variables = tiny
  images, labels = _toy(64)

  def epoch_batches(epoch):
    order = np.random.default_rng(epoch).permutation(64)
    return [(images[order[i:i + 16]], labels[order[i:i + 16]]) for i in range(0, 64, 16)]

  out, history = train.fit(module, variables, epoch_batches, epochs=2, optimizer=optax.sgd(0.1), progress=False)
  assert len(history) == 2 and np.isfinite(history[-1]["loss"])
  assert ifjax.train.state_variables(train.init_state(module, out, optax.sgd(0.1))).keys() == out.keys()


# -- bad inputs (issue 22, item 5) ---------------------------------------------------------------------
def test_fit_refuses_a_checkpoint_dir_orbax_would_glob(tiny, tmp_path):
  module, variables = tiny
  for name in ("runs[1]", "back\\slash"):
    with pytest.raises(ifjax.CheckpointError, match=r"checkpoint_dir=.*orbax reads as a glob pattern"):
      train.fit(module, variables, _toy(32), epochs=1, optimizer=optax.sgd(0.1), batch_size=16, progress=False,
                checkpoint_dir=tmp_path / name)
  assert list(tmp_path.iterdir()) == []  # refused before anything was trained or written


def test_fit_stops_on_nan_inputs_and_refuses_bad_labels(tiny):
  module, variables = tiny
  opt = optax.sgd(0.1)
  images, labels = _toy(32)
  nan_images = images.copy()
  nan_images[5, 0, 0, 0] = np.nan
  with pytest.raises(train.TrainingError, match=r"train_data: the images hold NaN or inf \(first in example 5\)"):
    train.fit(module, variables, (nan_images, labels), epochs=1, optimizer=opt, batch_size=16, progress=False)
  # a batch callable cannot be checked up front: the NaN loss stops the run, naming the epoch and step
  with pytest.raises(FloatingPointError, match=r"loss became nan at epoch 1, step 2"):
    train.fit(module, variables, lambda e: [(images[:16], labels[:16]), (nan_images[:16], labels[:16])], epochs=1,
              optimizer=opt, progress=False)
  bad = labels.copy()
  bad[3] = 3  # TinyCNN has 3 outputs
  with pytest.raises(train.TrainingError, match=r"labels must be class indices in \[0, 3\) \(the model has 3 "
                                                r"outputs\), got 3"):
    train.fit(module, variables, (images, bad), epochs=1, optimizer=opt, batch_size=16, progress=False)
  with pytest.raises(train.TrainingError, match=r"epoch 1, step 1: the batch's labels must be class indices in "
                                                r"\[0, 3\).*got -1"):
    train.fit(module, variables, lambda e: [(images[:16], labels[:16] - 1)], epochs=1, optimizer=opt, progress=False)
  with pytest.raises(train.TrainingError, match=r"train_data\[1\]: labels must be class indices in \[0, 3\)"):
    train.fit_many(module, [variables, variables], [(images, labels), (images, bad)], epochs=1, optimizer=opt,
                   batch_size=16, progress=False)


def test_resume_refuses_another_optimizer_and_fewer_epochs(tiny, tmp_path):
  pytest.importorskip("orbax.checkpoint")
  module, variables = tiny
  data = _toy(32)
  kw = dict(batch_size=16, progress=False, checkpoint_dir=tmp_path)
  train.fit(module, variables, data, epochs=2, optimizer=optax.sgd(0.1, momentum=0.9), **kw)
  for other in (optax.sgd(0.05, momentum=0.9), optax.sgd(0.1), optax.adam(0.1),
                optax.sgd(optax.exponential_decay(0.1, 3, 0.5, staircase=True), momentum=0.9)):
    with pytest.raises(train.TrainingError, match="written with another optimizer, learning rate or schedule.*"
                                                  "allow_optimizer_change=True"):
      train.fit(module, variables, data, epochs=3, optimizer=other, **kw)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1", "epoch_2"]
  with pytest.raises(train.TrainingError, match=r"epochs=1, but checkpoint_dir already holds epoch 2 .*epochs >= 2"):
    train.fit(module, variables, data, epochs=1, optimizer=optax.sgd(0.1, momentum=0.9), **kw)
  # the same optimizer built again resumes; a finished run returns its model; the override continues with another
  done, hist = train.fit(module, variables, data, epochs=2, optimizer=optax.sgd(0.1, momentum=0.9), **kw)
  assert [h["epoch"] for h in hist] == [1, 2]
  out, hist = train.fit(module, variables, data, epochs=3, optimizer=optax.sgd(0.05, momentum=0.9),
                        allow_optimizer_change=True, **kw)
  assert [h["epoch"] for h in hist] == [1, 2, 3]
  with pytest.raises(train.TrainingError, match="does not fit the new optimizer"):  # adam's state is not sgd's
    train.fit(module, variables, data, epochs=4, optimizer=optax.adam(0.1), allow_optimizer_change=True, **kw)
