"""Folding inference-mode BatchNorm into the layer before it (paper Eq. 1, with eps)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from ifjax._spec import Group, Member, Spec, Variables, array_module, flatten, unflatten


def fold_batchnorm(variables: Variables, spec: Spec) -> dict:
  """Folds every BatchNorm of ``spec.batchnorms`` into its preceding layer.

  With ``s = scale / sqrt(var + eps)`` the layer's kernel (out axis last, the
  Flax layout) becomes ``kernel * s`` and the shift ``bias_bn - mean * s`` moves
  into the layer's bias. A layer without a bias keeps the shift in the BN's own
  ``bias``, so the module structure never changes. The BN is left as an exact
  identity on its input (``mean = 0``, ``var = 1 - eps``, ``scale = 1``, plus
  that bias when the layer has none), so ``apply(..., train=False)`` gives the
  same outputs to float tolerance. Computed in float32, returned in each
  array's dtype; the input is not modified. NumPy arrays in give NumPy arrays
  out (the host path of :func:`ifjax.plan`), jax arrays give jax arrays.

  >>> import jax.numpy as jnp, ifjax
  >>> v = {"params": {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
  ...                 "bn": {"scale": jnp.full(3, 2.), "bias": jnp.ones(3)}},
  ...      "batch_stats": {"bn": {"mean": jnp.ones(3), "var": jnp.full(3, 4. - 1e-5)}}}
  >>> spec = ifjax.Spec(groups=(), batchnorms=[("fc", "bn")])
  >>> f = ifjax.fold_batchnorm(v, spec)
  >>> f["params"]["fc"]["kernel"][0].tolist(), f["params"]["fc"]["bias"].tolist()
  ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
  """
  return unflatten(folded_flat(variables, spec))


def folded_flat(variables: Variables, spec: Spec) -> dict:
  """:func:`fold_batchnorm`, returned flat (``{"params/a/kernel": array}``)."""
  flat = dict(flatten(variables))
  for pair in spec.batchnorms:
    kp, bp = f"params/{pair.layer}/kernel", f"params/{pair.layer}/bias"
    sp, sb = f"params/{pair.bn}/scale", f"params/{pair.bn}/bias"
    mp, vp = f"batch_stats/{pair.bn}/mean", f"batch_stats/{pair.bn}/var"
    for p in (kp, mp, vp):
      if p not in flat:
        raise ValueError(f"batchnorm pair {tuple(pair)!r}: missing {p!r}")
    kernel = flat[kp]
    xp = array_module(*(flat[p] for p in (kp, mp, vp, bp, sp, sb) if p in flat))
    f32 = lambda p, default: xp.asarray(flat[p], xp.float32) if p in flat else default  # noqa: B023 (used here)
    mean, var = f32(mp, None), f32(vp, None)
    scale, shift = f32(sp, 1.0), f32(sb, 0.0)
    if jnp.shape(mean)[0] != kernel.shape[-1]:
      raise ValueError(f"batchnorm pair {tuple(pair)!r}: {mp} has {jnp.shape(mean)[0]} channels, "
                       f"{kp} has {kernel.shape[-1]} outputs")
    if not isinstance(var, jax.core.Tracer) and bool(xp.any(var + pair.eps <= 0)):
      raise ValueError(f"{vp!r} has entries with var + eps <= 0 (min {float(xp.min(var))}); cannot fold "
                       f"batchnorm pair {tuple(pair)!r}")
    s = scale * xp.reciprocal(xp.sqrt(var + xp.float32(pair.eps)))
    flat[kp] = (xp.asarray(kernel, xp.float32) * s).astype(kernel.dtype)
    new_shift = shift - mean * s
    if bp in flat:
      b = flat[bp]
      flat[bp] = (xp.asarray(b, xp.float32) * s + new_shift).astype(b.dtype)
      new_shift = xp.zeros_like(mean)
    elif sb not in flat:
      raise ValueError(f"batchnorm pair {tuple(pair)!r}: the layer has no bias and the BN has no bias, "
                       "so the BN's shift (bias - mean * scale / sqrt(var + eps)) has nowhere to go")
    if sb in flat:
      flat[sb] = xp.broadcast_to(new_shift, xp.shape(flat[sb])).astype(flat[sb].dtype)
    if sp in flat:
      flat[sp] = xp.ones_like(flat[sp])
    flat[mp] = xp.zeros_like(flat[mp])
    flat[vp] = xp.full_like(flat[vp], 1.0 - pair.eps)
  return flat


def train_mode_statistics(apply_fn, flat: Mapping[str, Any], paths: list[str], x: Any, fill: Any) -> dict:
  """``{path: running statistic}`` for the ``batch_stats`` ``paths`` of ``flat`` after one train-mode pass
  ``apply_fn(v, x, train=True, mutable=["batch_stats"])`` that starts from all of them equal to ``fill``: a linen
  BN returns ``momentum * fill + (1 - momentum) * (the batch's statistic)``, so passes from 0 and from 1 give
  the batch statistics whatever the momentum. Differentiable in ``x``."""
  v = unflatten({**flat, **{p: jnp.full_like(flat[p], fill) for p in paths}})
  _, upd = apply_fn(v, x, train=True, mutable=["batch_stats"])
  got = flatten({"batch_stats": upd["batch_stats"]})
  return {p: got[p] for p in paths}


def bn_paths(spec: Spec, layer: str) -> dict[str, str]:
  """Per-channel BN arrays that follow ``layer`` (a module path): ``{path: role}``.

  Roles: ``"shift"`` for the BN bias (fused like a producer bias), ``"identity"``
  for scale / mean / var, which are constants after folding.
  """
  out = {}
  for pair in spec.batchnorms:
    if pair.layer == layer:
      out[f"params/{pair.bn}/bias"] = "shift"
      out[f"params/{pair.bn}/scale"] = "identity"
      out[f"batch_stats/{pair.bn}/mean"] = "identity"
      out[f"batch_stats/{pair.bn}/var"] = "identity"
  return out


def derived_bn(spec: Spec, group: Group) -> list[tuple[Member, str]]:
  """The folded BN arrays of the group's producer layers, at the producers' offsets, with their role
  (see :func:`bn_paths`)."""
  out = []
  for m in group.producers:
    if m.path.startswith("params/") and m.path.endswith("/kernel"):
      layer = m.path[len("params/"):-len("/kernel")]
      out += [(Member(path, 0, m.offset), role) for path, role in bn_paths(spec, layer).items()]
  return out


def input_statistics(variables: Variables, spec: Spec) -> dict[str, np.ndarray]:
  """Per BN pair of ``spec``, the mean and standard deviation of the BN's input channels in the *folded*
  model, from the BN's running statistics: ``{".../mean": (C,) mean, ".../var": (C,) deviation}`` (the var
  path holds a deviation, which maps linearly; square it to get a variance). BNs without both a scale and a
  bias parameter are left out (they cannot be given statistics without changing the function).

  Folded, BN input channel i is ``w_i = s_i * u_i + c_i`` (u: the original BN input, running mean m_i and
  var v_i; s_i = gamma_i / sqrt(v_i + eps); c_i: what folding moved into the layer's bias), so
  ``E[w_i] = s_i * m_i + c_i`` and ``sd(w_i) = |s_i| * sqrt(v_i)``.
  """
  flat, folded, out = flatten(variables), folded_flat(variables, spec), {}
  for pair in spec.batchnorms:
    mean, var = f"batch_stats/{pair.bn}/mean", f"batch_stats/{pair.bn}/var"
    scale, bias = f"params/{pair.bn}/scale", f"params/{pair.bn}/bias"
    if scale not in flat or bias not in flat:
      continue
    m, v, g = (np.asarray(flat[p], np.float64) for p in (mean, var, scale))
    s = g / np.sqrt(v + pair.eps)
    layer_bias = f"params/{pair.layer}/bias"
    c = (np.asarray(folded[layer_bias], np.float64) - s * np.asarray(flat[layer_bias], np.float64)
         if layer_bias in flat else 0.0)
    out[mean] = (s * m + c).astype(np.float32)
    out[var] = (np.abs(s) * np.sqrt(v)).astype(np.float32)
  return out


def with_statistics(flat: Mapping[str, Any], spec: Spec, statistics: Mapping[str, Any]) -> dict:
  """A folded flat tree whose BNs (the pairs in ``statistics``, as :func:`input_statistics` returns them,
  at this tree's widths) get running mean mu, var sd**2, scale sqrt(var + eps) and bias mu + (folded bias):
  the same eval-mode function, ``(w - mu) / sqrt(var + eps) * sqrt(var + eps) + mu + bias = w + bias``, and a
  training-mode BN (batch statistics) that starts near it when the statistics are right."""
  out = dict(flat)
  for pair in spec.batchnorms:
    mean, var = f"batch_stats/{pair.bn}/mean", f"batch_stats/{pair.bn}/var"
    if mean not in statistics:
      continue
    scale, bias = f"params/{pair.bn}/scale", f"params/{pair.bn}/bias"
    mu = np.asarray(statistics[mean], np.float32)
    variance = np.square(np.asarray(statistics[var], np.float32))
    values = {mean: mu, var: variance, scale: np.sqrt(variance + np.float32(pair.eps)),
              bias: mu + np.asarray(out[bias], np.float32)}
    for path, value in values.items():
      out[path] = np.broadcast_to(value, np.shape(out[path])).astype(np.asarray(out[path]).dtype)
  return out
