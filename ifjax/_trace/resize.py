"""Running a pruned model at its smaller shapes without rewriting it: :func:`resize` and :func:`resize_nnx`.

``resize`` traces ``apply_fn`` to a jaxpr at the *original* variable shapes and
re-evaluates it equation by equation on the pruned variables. Every axis of every
value of the program is a node of a small constraint system: the pruned
variables fix their axes, element-wise ops, contractions and convolutions equate
axes, concatenations and zero pads add them up, reshapes multiply them. Solving
it gives each value's new shape, and from it the new parameters of the
shape-carrying primitives (``reshape`` sizes, ``broadcast_in_dim`` and ``iota``
shapes, ``pad`` amounts, the ``feature_group_count`` of depthwise convs, full
slices). Axes that nothing constrains keep their original size.

Choices the shapes alone leave open, made by documented rules:

- a reshape that splits a shrunk axis (``heads * head_dim``): the outermost
  factor shrinks (whole heads are pruned), if it divides; else the next one;
- a zero pad on both sides of a shrunk axis (the option-A shortcut) and the free
  parts of a concatenation keep their original proportions (as a uniform ratio
  prunes them); if that is not an integer split, :class:`ResizeError`.

A shrunk axis holds the kept channels first (the zero-padded model has zeros
after them), so a program that reorders it (a reversal, a sort or argsort, a
gather or slice of part of it, a backwards cumulative product / max / min)
cannot be followed and raises :class:`ResizeError`. Anything else that cannot be
followed raises it too, naming the primitive and the shapes.

The system is :mod:`~ifjax._trace.constraints`, built from the jaxpr by
:mod:`~ifjax._trace.axis_rules`; this module solves it and runs the program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import numpy as np

from ifjax._trace.axis_rules import _Builder, _Frame, _shape, _where
from ifjax._trace.constraints import ResizeError, _Dims, solve
from ifjax._trace.primitives import CALL, PRIMITIVES

__all__ = ["ResizeError", "resize", "resize_nnx"]


# -- evaluation at the new shapes ---------------------------------------------------------------------
def _new_shape(d: _Dims, nodes) -> tuple[int, ...]:
  return tuple(d.value(n) for n in nodes)


def _eval(d: _Dims, f: _Frame, invals: list) -> list:
  env = dict(zip(f.jaxpr.constvars, f.consts))
  env.update(zip(f.jaxpr.invars, invals))
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
  for i, eqn in enumerate(f.jaxpr.eqns):
    ins = [read(v) for v in eqn.invars]
    outs = _eval_eqn(d, f, i, eqn, ins)
    for v, x in zip(eqn.outvars, outs):
      want = _new_shape(d, f.dims[v])
      if np.shape(x) != want:
        raise ResizeError(f"primitive {eqn.primitive.name!r}{_where(eqn)} gave shape {np.shape(x)} where the resized "
                          f"program needs {want} (original {_shape(v)})")
      env[v] = x
  return [read(v) for v in f.jaxpr.outvars]


def _eval_eqn(d: _Dims, f: _Frame, i: int, eqn, ins: list) -> list:
  name, p = eqn.primitive.name, dict(eqn.params)
  out_shapes = [_new_shape(d, f.dims[v]) for v in eqn.outvars]
  if PRIMITIVES.get(name) == CALL:
    return _eval(d, f.subs[i][0], ins)
  if name == "scan":
    nc, nk = p["num_consts"], p["num_carry"]
    body = f.subs[i][0]

    def step(carry, x):
      out = _eval(d, body, [*ins[:nc], *carry, *x])
      return out[:nk], out[nk:]

    carry, ys = jax.lax.scan(step, list(ins[nc:nc + nk]), list(ins[nc + nk:]), length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]
  if name == "while":
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cf, bf = f.subs[i]
    return jax.lax.while_loop(lambda c: _eval(d, cf, [*ins[:nc], *c])[0],
                              lambda c: _eval(d, bf, [*ins[nc:nc + nb], *c]), list(ins[nc + nb:]))
  if name == "cond":
    branches = [lambda *ops, bf=bf: _eval(d, bf, list(ops)) for bf in f.subs[i]]
    return jax.lax.switch(ins[0], branches, *ins[1:])
  if name == "reshape":
    p["new_sizes"] = out_shapes[0]
  elif name in ("broadcast_in_dim", "iota"):
    p["shape"] = out_shapes[0]
  elif name == "pad":
    pads = {c.out: c.config(d) for c in f.cons.get(i, ())}
    p["padding_config"] = tuple(pads.get(n, cfg) for n, cfg in zip(f.dims[eqn.outvars[0]], p["padding_config"]))
  elif name == "conv_general_dilated" and i in f.cons:
    p["feature_group_count"] = d.value(f.dims[eqn.invars[0]][p["dimension_numbers"][0][1]])
  elif name == "slice":
    p["limit_indices"] = tuple(new if (s, l) == (0, old) else l for s, l, old, new in
                               zip(p["start_indices"], p["limit_indices"], _shape(eqn.invars[0]), np.shape(ins[0])))
  elif name in ("dynamic_slice", "gather"):  # whole axes follow the operand
    p["slice_sizes"] = tuple(new if s == old else s for s, old, new in
                             zip(p["slice_sizes"], _shape(eqn.invars[0]), np.shape(ins[0])))
  elif name == "split":
    p["sizes"] = tuple(s[p["axis"]] for s in out_shapes)
  out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(p))
  return list(out) if eqn.primitive.multiple_results else [out]


# -- public API ---------------------------------------------------------------------------------------
def _key_path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _check_small(variables_struct, small_variables):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(small_variables)
  if treedef != variables_struct[1]:
    raise ResizeError(f"small_variables do not have the tree structure of the original variables:\n"
                      f"original {variables_struct[1]}\nsmall    {treedef}")
  for (path, x), ref in zip(leaves, variables_struct[0]):
    shape = np.shape(x)
    if len(shape) != len(ref.shape) or any(not 1 <= s <= r for s, r in zip(shape, ref.shape)):
      raise ResizeError(f"{_key_path(path)!r}: shape {shape} does not fit the original {ref.shape} (same rank, "
                        "every axis between 1 and its original size)")


def resize(apply_fn: Callable[..., Any], variables, small_variables, *args, **kwargs) -> Callable[..., Any]:
  """``small_apply(small_variables, *args, **kwargs)``: ``apply_fn`` re-evaluated at the pruned shapes.

  ``variables`` are the ones ``apply_fn`` was written for (only their shapes and
  dtypes are kept); ``small_variables`` have the same tree with every axis at most
  its original size, e.g. ``ifjax.apply_plan(variables, spec, plan)``. The example
  ``args`` / ``kwargs`` are checked once here; non-array keyword arguments
  (``train=False``) are static. ``small_apply`` is jit-able, accepts other
  argument shapes (each new shape is traced once) and computes what ``apply_fn``
  computes on the zero-padded ``apply_plan(..., keep_shapes=True)`` variables.
  Constants of the program keep their values, so a mean over a pruned axis (a
  LayerNorm's) still divides by the original length, as the zero-padded model
  does. Where the shapes leave a choice open (a split of ``heads * head_dim``, the
  two sides of a zero pad), the rules of this module's docstring decide: prune
  whole heads, and prune option-A padding segments at one ratio.
  Custom derivative rules of the program (``custom_jvp`` / ``custom_vjp``) are
  inlined: gradients go through their primal computation.

  Raises :class:`ResizeError` naming the primitive and shapes it cannot follow.

  >>> import flax.linen as nn, jax, jax.numpy as jnp, ifjax
  >>> net = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  >>> x = jnp.ones((4, 3))
  >>> v = net.init(jax.random.key(0), x)
  >>> small = jax.tree.map(lambda a: a[..., :5] if a.shape[-1] == 8 else a, v)       # 5 of 8 hidden neurons
  >>> small["params"]["layers_2"]["kernel"] = v["params"]["layers_2"]["kernel"][:5]
  >>> ifjax.resize(net.apply, v, small, x)(small, x).shape
  (4, 2)
  """
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  struct = ([jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in leaves], treedef)
  cache: dict = {}

  def program(small_leaves, arg_leaves, arg_tree, static):
    key = (tuple((np.shape(x), jax.numpy.result_type(x)) for x in small_leaves),
           tuple((np.shape(x), jax.numpy.result_type(x)) for x in arg_leaves), arg_tree, static)
    try:
      hit = cache.get(key)
    except TypeError:  # unhashable static keyword arguments: trace every call
      key, hit = None, None
    if hit is not None:
      return hit

    def fn(var_leaves, a_leaves):
      a, kw = jax.tree_util.tree_unflatten(arg_tree, a_leaves)
      return apply_fn(jax.tree_util.tree_unflatten(treedef, var_leaves), *a, **kw, **dict(static))

    orig = [jax.ShapeDtypeStruct(s.shape, jax.numpy.result_type(x)) for s, x in zip(struct[0], small_leaves)]
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(orig, list(arg_leaves))
    b = _Builder()
    in_nodes = [[b.d.node(o, n) for o, n in zip(s.shape, np.shape(x))] for s, x in zip(orig, small_leaves)]
    in_nodes += [[b.d.node(s, s) for s in np.shape(x)] for x in arg_leaves]
    top = b.frame(closed, in_nodes)
    solve(b.d, b.cons)
    hit = (b.d, top, jax.tree_util.tree_structure(out_shape))
    if key is not None:
      cache[key] = hit
    return hit

  def small_apply(small, *a, **kw):
    _check_small(struct, small)
    arrays = {k: v for k, v in kw.items() if isinstance(v, (jax.Array, np.ndarray))}
    static = tuple(sorted((k, v) for k, v in kw.items() if k not in arrays))
    arg_leaves, arg_tree = jax.tree_util.tree_flatten((a, arrays))
    small_leaves = jax.tree_util.tree_leaves(small)
    d, top, out_tree = program(small_leaves, arg_leaves, arg_tree, static)
    return jax.tree_util.tree_unflatten(out_tree, _eval(d, top, [*small_leaves, *arg_leaves]))

  jax.eval_shape(lambda s: small_apply(s, *args, **kwargs), small_variables)  # fail here, not at the first call
  return small_apply


def resize_nnx(model, small_variables):
  """A new NNX module like ``model`` at the pruned shapes of ``small_variables``.

  ``small_variables`` are in the layout of :func:`ifjax.nnx_apply` (``{"params": ..., "batch_stats": ...}``),
  e.g. ``ifjax.intra_fuse(variables, spec, 0.5)`` of ``apply_fn, variables = ifjax.nnx_apply(model)``.
  ``model`` is not modified. The size attributes of Flax's own layers (``nnx.Linear``, ``Conv`` incl.
  depthwise ``feature_group_count``, ``LinearGeneral``, ``Embed``, ``BatchNorm``, ``LayerNorm``,
  ``RMSNorm``, ``GroupNorm``, ``MultiHeadAttention``) are set from the new arrays. A custom module whose
  ``__call__`` reads its own width attributes (a reshape into ``self.heads``) is not rewritten: run it
  with :func:`resize` on ``nnx_apply(model)`` instead.
  """
  from flax import nnx

  from ifjax._trace.nnx import nnx_apply

  _, variables = nnx_apply(model)
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  _check_small(([jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in leaves], treedef),
               small_variables)
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  params, stats = jax.tree.map(lambda x: x, params), jax.tree.map(lambda x: x, stats)
  nnx.replace_by_pure_dict(params, small_variables["params"])
  if "batch_stats" in small_variables:
    nnx.replace_by_pure_dict(stats, small_variables["batch_stats"])
  new = nnx.merge(graphdef, params, stats, rest)
  for _, m in nnx.iter_modules(new):
    _fix_widths(nnx, m)
  return new


def _fix_widths(nnx, m):
  """Sets the size attributes of one of Flax's NNX layers from its (new) parameter shapes."""
  shape = lambda name: tuple(getattr(m, name)[...].shape)
  if isinstance(m, nnx.Linear):
    m.in_features, m.out_features = shape("kernel")
  elif isinstance(m, (nnx.Conv, nnx.ConvTranspose)):
    k = shape("kernel")
    if m.feature_group_count > 1 and m.kernel_shape[-2] == 1:  # depthwise: `mult` outputs per input channel
      m.feature_group_count = k[-1] // (m.kernel_shape[-1] // m.feature_group_count)
      m.in_features = m.feature_group_count
    else:
      m.in_features = k[-2] * m.feature_group_count
    m.kernel_shape, m.out_features = k, k[-1]
  elif isinstance(m, nnx.LinearGeneral):
    k = shape("kernel")
    m.in_features, m.out_features = k[:len(m.in_features)], k[len(m.in_features):]
  elif isinstance(m, nnx.Embed):
    m.num_embeddings, m.features = shape("embedding")
  elif isinstance(m, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)):
    arrays = [name for name in ("scale", "bias", "mean") if getattr(m, name, None) is not None]
    if arrays:
      m.num_features = shape(arrays[0])[-1]
      if isinstance(m, nnx.GroupNorm):
        m.group_size = m.num_features // m.num_groups
  elif isinstance(m, nnx.MultiHeadAttention):
    q, k, o = m.query.kernel[...].shape, m.key.kernel[...].shape, m.out.kernel[...].shape
    m.in_features, m.num_heads, m.head_dim = q
    m.qkv_features, m.in_kv_features, m.num_kv_heads, m.out_features = q[1] * q[2], k[0], k[1], o[-1]
