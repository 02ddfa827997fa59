"""The one table of jax primitives that :func:`ifjax.trace_spec` and :func:`ifjax.resize` follow.

:data:`PRIMITIVES` maps a primitive's name to its kind. Both interpreters dispatch
on it (``_Tracer.handler`` in :mod:`~ifjax._trace.interpreter`, ``_Builder.handler``
in :mod:`~ifjax._trace.axis_rules`): the kinds in :data:`GENERIC` have one rule per
kind, the others one rule per primitive (``p_<name>`` in the tracer, ``r_<name>``
in resize). A primitive not in the table, or one of :data:`NOT_TRACED` /
:data:`NOT_RESIZED`, is refused where it touches a channel axis (trace_spec: an
:class:`~ifjax.UnsupportedPrimitiveError`) or a pruned axis (resize: a
:class:`~ifjax.ResizeError`). tests/test_trace.py checks that both interpreters
handle every other entry.
"""

from __future__ import annotations

ELEMENTWISE = "elementwise"  # operands of one shape (up to scalars / size-1 axes) -> results of that shape
IDENTITY = "identity"  # one operand -> one result, the same values (a new dtype at most)
ORDERED = "ordered"  # element-wise shapes, but running along axes: see order_axes
REDUCTION = "reduction"  # removes the ``axes`` of its operand
WINDOW = "window"  # pooling: windows over some axes, the others kept
STRUCTURAL = "structural"  # moves entries between axes / positions: one rule each
CONTRACTION = "contraction"  # dot_general, conv_general_dilated
CALL = "call"  # a sub-jaxpr applied once to the operands
CONTROL = "control"  # scan / while / cond: sub-jaxprs with carries or branches

GENERIC = frozenset({ELEMENTWISE, IDENTITY, ORDERED, CALL})  # one rule per kind in both interpreters


def _kinds(**names: str) -> dict[str, str]:
  return {name: kind for kind, text in names.items() for name in text.split()}


PRIMITIVES: dict[str, str] = _kinds(
    elementwise="""add sub mul div max min neg exp exp2 log log1p tanh logistic abs sqrt rsqrt integer_pow pow
        square erf erfc erf_inv sign sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh expm1 cbrt lgamma
        digamma floor ceil round rem clamp nextafter is_finite ge gt le lt eq ne and or not xor population_count
        shift_left shift_right_logical shift_right_arithmetic logaddexp real imag conj add_any select_n""",
    identity="convert_element_type copy copy_p reduce_precision stop_gradient sharding_constraint",
    ordered="cumsum cumprod cummax cummin cumlogsumexp sort rev",
    reduction="reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin",
    window="reduce_window_sum reduce_window_max reduce_window_min reduce_window",
    structural="""broadcast_in_dim reshape transpose squeeze pad slice dynamic_slice dynamic_update_slice
        concatenate split iota gather optimization_barrier tile""",
    contraction="dot_general conv_general_dilated",
    call="""jit pjit closed_call core_call remat remat2 checkpoint custom_jvp_call custom_vjp_call
        custom_vjp_call_jaxpr""",
    control="scan while cond",
)

NOT_TRACED: dict[str, str] = {  # in the table, followed by resize, refused by trace_spec on a channel axis
    "dynamic_update_slice": "an update of part of an array (a cache) gives no channel group",
    "while": "trace_spec follows lax.scan loops, not while loops",
}
NOT_RESIZED: dict[str, str] = {}  # the other way round


def order_axes(name: str, params, ndim: int) -> list[tuple[int, str, bool]]:
  """``(axis, what the op does along it, whether a shrunk axis can follow)`` for an :data:`ORDERED` primitive.

  A shrunk axis holds the kept channels first (the zero-padded model has zeros
  after them): a reversal, a sort (argsort too: a sort of an iota along) or a
  backwards cumulative product / max / min / log-sum-exp meets the zeros first and
  cannot follow; a forwards one, and any cumulative sum, can.
  """
  if name == "rev":
    return [(k % ndim, "reverses", False) for k in params["dimensions"]]
  if name == "sort":
    return [(params["dimension"] % ndim, "sorts along", False)]
  back = bool(params.get("reverse"))
  return [(params["axis"] % ndim, f"accumulates ({name}) {'backwards ' if back else ''}along",
           not back or name == "cumsum")]
