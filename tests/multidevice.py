"""Multi-device and multi-process checks of ``ifjax.train``, run in subprocesses by ``tests/test_train.py``.

The device count of XLA:CPU is fixed when JAX starts, so each check runs in its own process:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multidevice.py mesh OUT.npz
                                                     # data parallel over 4 devices; 2 models x 2 devices
  python tests/multidevice.py single OUT.npz         # one device: the reference step of `process`
  python tests/multidevice.py process OUT.npz I PORT  # process I of a 2-process jax.distributed run (1 device each)
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ifjax import train


class SmallCNN(nn.Module):
  """conv -> BN -> ReLU -> mean pool -> dense: small, but with batch statistics to share across devices."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
    return nn.Dense(10, name="fc")(x.mean(axis=(1, 2)))


def setup(batch: int = 16):
  module = SmallCNN()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, batch, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=(2, batch)).astype(np.int32)
  variables = [module.init(jax.random.key(i), jnp.zeros((1, 8, 8, 3))) for i in range(2)]
  return module, optax.sgd(0.1, momentum=0.9), images, labels, variables


def run_steps(step, state, images, labels, steps: int = 3):
  for s in range(steps):
    state, metrics = step(state, images, labels, jax.random.key(s))
  return state, metrics


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0) if hasattr(v, "addressable_data") else v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def mesh_checks(out: str):
  module, opt, images, labels, variables = setup()
  aug = train.flip_crop(2)
  results = {}
  # data parallel over 4 devices vs one device, 3 steps with augmentation
  single = train.make_step(module, opt, augment=aug)
  ref, ref_m = run_steps(single, train.init_state(module, variables[0], opt), images[0], labels[0])
  mesh = train.make_mesh({"data": 4})
  dp = train.make_step(module, opt, mesh, augment=aug)
  st = train.shard(train.init_state(module, variables[0], opt), train.shardings(mesh)[0])
  got, got_m = run_steps(dp, st, *train.shard((images[0], labels[0]), train.shardings(mesh)[1]))
  results["dp_devices"] = np.asarray(len(got.params["conv"]["kernel"].sharding.device_set))
  for k, v in flat(ref).items():
    results["dp_ref" + k], results["dp_got" + k] = v, flat(got)[k]
  results["dp_loss"] = np.asarray([ref_m["loss"], got_m["loss"]])
  # 2 models x 2 devices vs the two models trained one after the other (model i uses split(key, 2)[i])
  mesh2 = train.make_mesh({"models": 2, "data": 2})
  many = train.make_step(module, opt, mesh2, model_axis="models", augment=aug)
  state_sh, batch_sh = train.shardings(mesh2, "data", "models")
  st = train.shard(train.stack([train.init_state(module, v, opt) for v in variables]), state_sh)
  state = st
  for s in range(3):
    state, _ = many(state, *train.shard((images, labels), batch_sh), jax.random.key(s))
  results["mm_devices"] = np.asarray([len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(state)][:1])
  for i in range(2):
    seq = train.init_state(module, variables[i], opt)
    for s in range(3):
      seq, _ = single(seq, images[i], labels[i], jax.random.split(jax.random.key(s), 2)[i])
    for k, v in flat(seq).items():
      results[f"mm{i}_ref" + k] = v
      results[f"mm{i}_got" + k] = flat(train.unstack(jax.device_get(state))[i])[k]
  np.savez(out, **results)


def single_step(out: str):
  module, opt, images, labels, variables = setup()
  state, m = run_steps(train.make_step(module, opt, augment=train.flip_crop(2)),
                       train.init_state(module, variables[0], opt), images[0], labels[0])
  np.savez(out, loss=np.asarray(m["loss"]), **flat(state))


def process_step(out: str, index: int, port: int):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=index)
  assert jax.process_count() == 2 and len(jax.devices()) == 2, (jax.process_count(), jax.devices())
  module, opt, images, labels, variables = setup()
  mesh = train.make_mesh({"data": 2})
  step = train.make_step(module, opt, mesh, augment=train.flip_crop(2))
  state_sh, batch_sh = train.shardings(mesh)
  state = train.shard(train.init_state(module, variables[0], opt), state_sh)
  state, m = run_steps(step, state, *train.shard((images[0], labels[0]), batch_sh))
  if index == 0:
    np.savez(out, loss=np.asarray(m["loss"].addressable_data(0)), **flat(state))
  jax.distributed.shutdown()


if __name__ == "__main__":
  if sys.argv[1] == "mesh":
    mesh_checks(sys.argv[2])
  elif sys.argv[1] == "single":
    single_step(sys.argv[2])
  else:
    process_step(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
