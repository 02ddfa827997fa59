"""Distillation without labels: a pruned (student) network trained toward the dense (teacher) network's outputs.

Public as :func:`ifjax.finetune.distill` (and :func:`ifjax.finetune.kl_to_teacher`); see :func:`distill`.
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ifjax import train
from ifjax._errors import ArgumentTypeError
from ifjax._mesh import TrainingError, shard, shardings
from ifjax._scalars import python_scalar

DEFAULT_LR = 1e-4


class DistillResult(NamedTuple):
  """Attributes: the trained student ``variables`` (host arrays); ``history``: one dict per logged step
  (``step``, ``kl``: mean KL(teacher || student) at the temperature over the steps since the previous entry,
  ``feature``: likewise the feature loss when ``features`` are given, ``loss``: the objective); ``seconds``
  of this call; ``images_seen``: steps taken (resumed ones included) x batch size."""

  variables: dict
  history: list[dict]
  seconds: float
  images_seen: int


def default_optimizer(steps: int) -> optax.GradientTransformation:
  """Adam, lr ``1e-4`` decayed to 0 by a cosine over ``steps``: small steps, since the student starts near the
  teacher (pruning keeps most of its function) and only the lost part should move."""
  return optax.adam(optax.cosine_decay_schedule(DEFAULT_LR, steps))


def kl_divergence(teacher_logits, student_logits, temperature: float = 1.0) -> jax.Array:
  """Mean over the batch of ``KL(softmax(t / T) || softmax(s / T))`` (float32; no ``T ** 2`` factor)."""
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1))


def gram_loss(teacher_feature, student_feature) -> jax.Array:
  """Similarity-preserving feature loss (Tung & Mori, ICCV 2019), independent of the channel counts:
  each feature (B, ...) is flattened to (B, D), its B x B Gram matrix ``F F^T`` is L2-normalised row by row,
  and the loss is the mean squared difference of the two normalised matrices (``||G_t - G_s||_F^2 / B^2``)."""

  def gram(f):
    f = f.astype(jnp.float32).reshape(f.shape[0], -1)
    g = f @ f.T
    return g / jnp.maximum(jnp.linalg.norm(g, axis=1, keepdims=True), 1e-12)

  return jnp.mean((gram(teacher_feature) - gram(student_feature)) ** 2)


def _paths(features) -> tuple[tuple[str, ...], ...]:
  if features is None:
    return ()
  if isinstance(features, str):
    features = [features]
  if not isinstance(features, (list, tuple)):
    raise ArgumentTypeError(f"features must be a sequence of module paths, got {type(features).__name__}")
  out = []
  for f in features:
    path = tuple(f.split("/")) if isinstance(f, str) else tuple(f)
    if not path or not all(isinstance(p, str) and p for p in path):
      raise ArgumentTypeError(f"features must be module paths ('block1/bn' or ('block1', 'bn')), got {f!r}")
    out.append(path)
  return tuple(out)


def _forward(module, variables, images, train_mode: bool, paths):
  """``(logits, [feature per path], new batch_stats or None)`` of ``module`` on ``images``."""
  mutable = ["batch_stats"] if train_mode and jax.tree_util.tree_leaves(variables.get("batch_stats", {})) else []
  kwargs = {}
  if paths:
    wanted = set(paths)
    mutable.append("intermediates")
    kwargs["capture_intermediates"] = lambda mdl, name: name == "__call__" and tuple(mdl.path) in wanted
  if not mutable:
    return module.apply(variables, images, train=train_mode), [], None
  logits, new = module.apply(variables, images, train=train_mode, mutable=mutable, **kwargs)
  feats = []
  for path in paths:
    node = new.get("intermediates", {})
    for name in path:
      node = node.get(name, {}) if isinstance(node, Mapping) else {}
    if not isinstance(node, Mapping) or "__call__" not in node:
      raise TrainingError(f"features: no module {'/'.join(path)!r} in {type(module).__name__} (module paths are the "
                          "names of submodules joined by '/', e.g. 'bn1' or 'layer1/block0/bn1')")
    feats.append(node["__call__"][0])
  return logits, feats, new.get("batch_stats") if "batch_stats" in mutable else None


def _step_fn(student, teacher, optimizer, temperature, feature_weight, paths, augment, train_bn):
  def step(state: train.TrainState, teacher_variables, images, key):
    if augment is not None:
      images = augment(key, images)
    t_logits, t_feats, _ = _forward(teacher, teacher_variables, images, False, paths)
    t_logits, t_feats = jax.lax.stop_gradient((t_logits, t_feats))

    def loss_fn(params):
      variables = {"params": params}
      if jax.tree_util.tree_leaves(state.batch_stats):
        variables["batch_stats"] = state.batch_stats
      logits, feats, new_stats = _forward(student, variables, images, train_bn, paths)
      kl = kl_divergence(t_logits, logits, temperature)
      feature = sum(gram_loss(t, s) for t, s in zip(t_feats, feats)) / len(paths) if paths else jnp.zeros(())
      loss = temperature ** 2 * kl + feature_weight * feature
      return loss, (kl, feature, state.batch_stats if new_stats is None else new_stats)

    (loss, (kl, feature, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return train.TrainState(params, batch_stats, opt_state, state.step + 1), {"kl": kl, "feature": feature,
                                                                               "loss": loss}

  return step


def _check_inputs(inputs) -> np.ndarray:
  if isinstance(inputs, (tuple, list)):
    raise ArgumentTypeError(
        f"inputs must be one array of unlabelled images (N, H, W, C), got a {type(inputs).__name__} of "
        f"{len(inputs)}" + ("; distill uses no labels: pass the images alone, e.g. inputs=images rather than "
                            "(images, labels)" if len(inputs) == 2 else ""))
  if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
    raise ArgumentTypeError(f"inputs must be an array of images (N, H, W, C), got {type(inputs).__name__}")
  if np.ndim(inputs) not in (2, 4):
    raise TrainingError(f"inputs must be images (N, H, W, C) (or feature vectors (N, D)), got shape "
                        f"{tuple(np.shape(inputs))}; a single image needs a leading batch axis (x[None])")
  if not jnp.issubdtype(inputs.dtype, jnp.floating):
    raise TrainingError(f"inputs must be preprocessed floating-point images, got dtype {inputs.dtype}")
  if len(inputs) == 0:
    raise TrainingError(f"inputs is empty (shape {tuple(inputs.shape)})")
  bad = train._first_non_finite(inputs)
  if bad is not None:
    raise TrainingError(f"inputs hold NaN or inf (first in example {bad}); every loss would be NaN")
  return inputs


def _number(x, what: str, kinds: str = "iuf") -> Any:
  x = python_scalar(x, kinds, what)
  if isinstance(x, bool) or not isinstance(x, (int, float) if "f" in kinds else int):
    raise ArgumentTypeError(f"{what} must be {'a number' if 'f' in kinds else 'an int'}, got {x!r}")
  if not np.isfinite(x):
    raise TrainingError(f"{what} must be finite, got {x}")
  return x


def _checksum(inputs) -> int:
  """A cheap fingerprint of the inputs' values: CRC32 of up to 64 evenly spaced examples."""
  idx = np.unique(np.linspace(0, len(inputs) - 1, min(64, len(inputs))).astype(int))
  return zlib.crc32(np.ascontiguousarray(np.asarray(inputs[idx])).tobytes())


def distill(student_module, student_variables: Mapping[str, Any], teacher_module, teacher_variables: Mapping[str, Any],
            inputs, *, steps: int, optimizer=None, batch_size: int = 64, temperature: float = 1.0,
            feature_weight: float = 0.0, features: Sequence[str] | None = None, augment: train.Augment | None = None,
            train_bn: bool = False, mesh: Mesh | None = None, checkpoint_dir=None, seed: int = 0,
            progress: bool = True, data_axis: str = "data", log_every: int = 10, checkpoint_every: int = 500,
            allow_optimizer_change: bool = False, desc: str = "distill") -> DistillResult:
  """Trains the student toward the teacher's outputs on unlabelled ``inputs`` for ``steps`` steps.

  The loss of a batch is ``T**2 * KL(softmax(t / T) || softmax(s / T)) + feature_weight * F`` with teacher logits
  t, student logits s (both (B, classes), mean over the batch), ``T = temperature`` and ``F`` the mean over
  ``features`` of :func:`gram_loss`: the student's and teacher's outputs of the module at each path (captured with
  flax's ``capture_intermediates``) are compared through their normalised B x B Gram matrices across the batch
  (similarity-preserving distillation), which needs no map between the pruned and the dense channels. Its values
  are small (entries of unit-norm rows), so useful weights are large (Tung & Mori use ~1000-3000). The teacher
  always runs in eval mode and gets no gradient.

  Args:
    student_module: the pruned network's module (e.g. at ``ifjax.widths`` of ``ifjax.apply_plan``'s output);
      called as ``module.apply(v, x, train=...)``, as :mod:`ifjax.train` does.
    student_variables: the pruned network's variables.
    teacher_module: the dense network's module; same input and number of outputs.
    teacher_variables: the dense network's variables.
    inputs: (N, H, W, C) preprocessed float images (or (N, D) vectors for dense models), e.g. real images or
      ``ifjax.synthesize_inputs(...).inputs``; no labels. Batches of ``batch_size`` are drawn without replacement,
      reshuffled by ``(seed, epoch)`` after each pass (the remainder of a pass is dropped).
    steps: optimizer steps in total (a resumed run continues up to it).
    batch_size: inputs per step.
    temperature: ``T`` of the loss.
    feature_weight: the weight of the feature loss ``F`` in the loss.
    optimizer: an optax transformation or a callable ``steps -> transformation``; default :func:`default_optimizer`
      (Adam, lr 1e-4, cosine decay over ``steps``). Its schedule depends on ``steps``, so a resume with a larger
      ``steps`` is refused as another optimizer: to extend a run pass an explicit optimizer (or
      ``allow_optimizer_change=True``).
    features: a sequence of module paths (``"bn1"``, ``"layer1/block0/bn1"`` or tuples of names) present in both
      networks; their feature loss is logged whenever given and trained on with ``feature_weight``.
    augment: ``(key, images) -> images`` (e.g. :func:`ifjax.train.flip_crop`) applied to each batch before both
      networks see it; step s uses key ``fold_in(key(seed), s)``.
    train_bn: False: the student runs in eval mode (BN statistics frozen; a BN folded by ``ifjax.apply_plan`` stays
      folded) and only params are trained. True: train mode, BN normalises by batch statistics and updates
      ``batch_stats``; for students whose BNs have statistics (:func:`ifjax.unfold_batchnorm`,
      :func:`ifjax.recalibrate_batchnorm`).
    mesh: data-parallel over ``data_axis`` as :func:`ifjax.train.make_step` (state and teacher replicated, batch
      split; the result equals the one-device run up to float reassociation). ``batch_size`` must divide evenly.
    checkpoint_dir: the state and history are saved there every ``checkpoint_every`` steps and at the end (orbax,
      ``step_<s>``); a new call with the same directory continues from the last saved step with the same batches
      and keys, ending where an uninterrupted run ends. Resuming refuses other data, batch size, seed, loss
      settings or optimizer (see :func:`ifjax.train.fit`) and ``steps`` below the saved step; the mesh may change.
    checkpoint_every: steps between checkpoints.
    allow_optimizer_change: resume with another optimizer on purpose, as for :func:`ifjax.train.fit`.
    seed: the batch order (``(seed, epoch)``) and the augmentation keys.
    progress: a tqdm bar over the steps with the KL of the last logged window.
    log_every: steps per history entry (an entry is also logged at every checkpoint and at the last step, so with
      a ``checkpoint_dir`` the history of a resumed run equals that of an uninterrupted one).
    data_axis: the mesh axis of the batch.
    desc: the progress bar's label.

  Returns:
    :class:`DistillResult` ``(variables, history, seconds, images_seen)``.

  Raises ``TrainingError`` / ``ArgumentTypeError`` (both ``ValueError``) naming the argument for empty, non-finite,
  wrongly shaped or labelled inputs and bad settings, and ``FloatingPointError`` if the loss becomes NaN or inf.

  Examples::

    module, spec = ifjax.models.get("resnet20")  # and its trained dense `variables`
    pruned = ifjax.intra_fuse(variables, spec, 0.5)
    student, _ = ifjax.models.get("resnet20", widths=ifjax.widths(pruned, spec))
    fake = ifjax.synthesize_inputs(module.apply, variables, (32, 32, 3), count=512).inputs  # or real images
    result = ifjax.finetune.distill(student, pruned, module, variables, fake, steps=2000, temperature=4.0)
    result.history[-1]["kl"]
  """
  t0 = time.perf_counter()
  inputs = _check_inputs(inputs)
  steps = _number(steps, "steps", "iu")
  batch_size = _number(batch_size, "batch_size", "iu")
  log_every, checkpoint_every = _number(log_every, "log_every", "iu"), _number(checkpoint_every, "checkpoint_every",
                                                                               "iu")
  for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every),
                      ("checkpoint_every", checkpoint_every)):
    if value < 1:
      raise TrainingError(f"{name} must be >= 1, got {value}")
  temperature, feature_weight = _number(temperature, "temperature"), _number(feature_weight, "feature_weight")
  seed = _number(seed, "seed", "iu")
  if seed < 0:
    raise TrainingError(f"seed must be >= 0, got {seed}")
  if temperature <= 0:
    raise TrainingError(f"temperature must be > 0, got {temperature}")
  if feature_weight < 0:
    raise TrainingError(f"feature_weight must be >= 0, got {feature_weight}")
  paths = _paths(features)
  if feature_weight > 0 and not paths:
    raise TrainingError(f"feature_weight={feature_weight} needs features: the module paths whose outputs to compare")
  if batch_size > len(inputs):
    raise TrainingError(f"batch_size={batch_size}, but inputs holds only {len(inputs)} images; pass batch_size <= "
                        f"{len(inputs)} or more inputs")
  if mesh is not None:
    state_sh, batch_sh = shardings(mesh, data_axis)
    if batch_size % mesh.shape[data_axis]:
      raise TrainingError(f"batch_size={batch_size} cannot be split evenly over mesh axis {data_axis!r} of size "
                          f"{mesh.shape[data_axis]}")
  else:
    state_sh = batch_sh = None
  for what, v in (("student_variables", student_variables), ("teacher_variables", teacher_variables)):
    if not isinstance(v, Mapping) or "params" not in v:
      raise ArgumentTypeError(f"{what} must be a Flax variables dict with 'params', got {type(v).__name__}")
  _check_outputs(student_module, student_variables, teacher_module, teacher_variables, inputs[:1], paths)
  if optimizer is None:
    optimizer = default_optimizer(steps)
  elif not isinstance(optimizer, optax.GradientTransformation):
    if not callable(optimizer):
      raise ArgumentTypeError(f"optimizer must be an optax transformation or a callable steps -> one, got "
                              f"{type(optimizer).__name__}")
    optimizer = optimizer(steps)

  fingerprint = {"kind": "distill", "inputs": [*map(int, inputs.shape)], "checksum": _checksum(inputs),
                 "batch_size": batch_size, "seed": seed, "temperature": temperature, "feature_weight": feature_weight,
                 "features": ["/".join(p) for p in paths], "train_bn": bool(train_bn), "augment": augment is not None}
  optimizer = cast(optax.GradientTransformation, optimizer)  # (a factory's result)
  probe = train._probe(optimizer) if checkpoint_dir is not None else None
  state, history, start = train.init_state(student_module, student_variables, optimizer), [], 0
  if checkpoint_dir is not None:
    from ifjax import _save
    _save.check_path(checkpoint_dir, "checkpoint_dir")
    state, history, start = train._resume(checkpoint_dir, state, fingerprint, probe, allow_optimizer_change, steps,
                                          unit="step")
  state = shard(jax.tree_util.tree_map(jnp.array, state), state_sh)  # a copy: the steps donate it
  teacher = shard(dict(teacher_variables), state_sh)
  step = _jitted_step(student_module, teacher_module, optimizer, temperature, feature_weight, paths, augment,
                      bool(train_bn), mesh, data_axis)
  per_epoch, key = len(inputs) // batch_size, jax.random.key(seed)
  bar = train._bar(progress and jax.process_index() == 0, steps, desc)
  if bar is not None and start:
    bar.update(start)
  window, first = [], start + 1
  for s in range(start, steps):
    epoch, i = divmod(s, per_epoch)
    order = _order(seed, epoch, len(inputs))
    idx = np.sort(order[i * batch_size:(i + 1) * batch_size])
    state, metrics = step(state, teacher, shard(np.asarray(inputs[idx]), batch_sh), jax.random.fold_in(key, s))
    window.append(metrics)
    done = s + 1
    save = checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps)
    if done % log_every == 0 or done == steps or save:
      sums = jax.device_get(jax.tree_util.tree_map(lambda *x: jnp.stack(x), *window))
      means = {k: float(np.mean(sums[k])) for k in ("kl", "feature", "loss")}
      if not all(np.isfinite(list(means.values()))):
        raise FloatingPointError(f"{desc}: the distillation loss became NaN or inf between steps {first} and {done} "
                                 "(not checkpointed); likely a learning rate that diverges or a model producing NaN")
      if not paths:
        means.pop("feature")
      history.append({"step": done, **means})
      window, first = [], done + 1
      if bar is not None:
        bar.set_postfix({"kl": f"{means['kl']:.4f}"})
    if bar is not None:
      bar.update(1)
    if save:
      train._checkpoint(checkpoint_dir, state, history, done, fingerprint, probe, unit="step")
  if bar is not None:
    bar.close()
  return DistillResult(train.state_variables(jax.device_get(state)), history, time.perf_counter() - t0,
                       steps * batch_size)


@functools.lru_cache(maxsize=4)
def _order(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


@functools.lru_cache(maxsize=8)
def _jitted_step(student, teacher, optimizer, temperature, feature_weight, paths, augment, train_bn, mesh, data_axis):
  step = _step_fn(student, teacher, optimizer, temperature, feature_weight, paths, augment, train_bn)
  if mesh is None:
    return jax.jit(step, donate_argnums=(0,))
  state_sh, batch_sh = shardings(mesh, data_axis)
  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_sh, state_sh, batch_sh, replicated), out_shardings=(state_sh, replicated),
                 donate_argnums=(0,))


def _check_outputs(student, student_variables, teacher, teacher_variables, x, paths):
  """Both networks accept the inputs, give logits of one shape and have every feature path (shapes only)."""
  spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
  shapes = []
  for what, module, variables in (("student", student, student_variables), ("teacher", teacher, teacher_variables)):
    try:
      out = jax.eval_shape(lambda v, x, m=module: _forward(m, v, x, False, paths), dict(variables), spec)
    except TrainingError as e:
      raise TrainingError(f"{what}: {e}") from None
    except Exception as e:
      raise TrainingError(f"the {what} cannot be applied to inputs of shape {x.shape[1:]} (one example): "
                          f"{type(e).__name__}: {e}") from e
    shapes.append(out[0].shape if hasattr(out[0], "shape") else None)
  if shapes[0] is None or shapes[0] != shapes[1]:
    raise TrainingError(f"the student's outputs {shapes[0]} and the teacher's {shapes[1]} differ: distillation needs "
                        "logits of one shape (the same classes)")


def kl_to_teacher(student_module, student_variables, teacher_module, teacher_variables, inputs, *,
                  temperature: float = 1.0, batch_size: int = 500) -> float:
  """Mean ``KL(teacher || student)`` at ``temperature`` over ``inputs`` (N, ...), both networks in eval mode."""
  inputs = _check_inputs(inputs)
  fn = _kl_fn(student_module, teacher_module, float(temperature))
  total = 0.0
  for i in range(0, len(inputs), batch_size):
    x = jnp.asarray(inputs[i:i + batch_size])
    total += float(fn(student_variables, teacher_variables, x)) * len(x)
  return total / len(inputs)


@functools.lru_cache(maxsize=16)
def _kl_fn(student, teacher, temperature: float) -> Callable:
  @jax.jit
  def fn(sv, tv, x):
    return kl_divergence(teacher.apply(tv, x, train=False), student.apply(sv, x, train=False), temperature)

  return fn
