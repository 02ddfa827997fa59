"""Programs as functions: tracing a model's jaxpr into a group spec, checking a spec, re-running at new shapes.

* :mod:`~ifjax._trace.primitives`: the one table of jax primitives (kind of each) both interpreters dispatch on;
* :mod:`~ifjax._trace.unionfind`: the one union-find (channel classes of the tracer, axis sizes of resize);
* :mod:`~ifjax._trace.values`: channel-class segments, classes and the values the tracer tracks;
* :mod:`~ifjax._trace.interpreter`: the jaxpr interpreter of :func:`trace_spec` (classes, element-wise ops),
  with the primitive rules of :mod:`~ifjax._trace.shape_rules` and :mod:`~ifjax._trace.contraction_rules`;
* :mod:`~ifjax._trace.spec`: :func:`trace_spec`, the Spec from a finished trace;
* :mod:`~ifjax._trace.check`: :func:`check_spec`;
* :mod:`~ifjax._trace.constraints`: resize's constraint system over axis sizes and its solver, built from a
  jaxpr by :mod:`~ifjax._trace.axis_rules`;
* :mod:`~ifjax._trace.resize`: :func:`resize` / :func:`resize_nnx`, the runner (imported from there, not
  re-exported here: the name ``resize`` would hide the module);
* :mod:`~ifjax._trace.nnx`: :func:`nnx_apply`, the NNX adapter.
"""

from ifjax._trace.check import SpecCheckError, check_spec
from ifjax._trace.nnx import nnx_apply
from ifjax._trace.spec import trace_spec
from ifjax._trace.values import PaddedChannelsWarning, UnsupportedPrimitiveError

__all__ = ["PaddedChannelsWarning", "SpecCheckError", "UnsupportedPrimitiveError", "check_spec", "nnx_apply",
           "trace_spec"]
