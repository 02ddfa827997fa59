"""Folding inference-mode BatchNorm into the layer before it (paper Eq. 1, with eps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ifjax._spec import Spec, Variables, array_module, flatten, unflatten


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
    f32 = lambda p, default: xp.asarray(flat[p], xp.float32) if p in flat else default
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
