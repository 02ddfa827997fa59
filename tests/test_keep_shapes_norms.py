"""``keep_shapes`` against the pruned model for norm-coupled (pruning-only) groups (issue 21 item 5).

On every norm-coupled row of the coverage table (tests/coverage_models.py), the pruning-only groups pruned at
0.25 run at their smaller shapes with ``ifjax.resize`` and give what the full-size model gives on the zero-padded
``apply_plan(..., keep_shapes=True)`` variables: Flax's LayerNorm takes E[x^2] - E[x]^2 over the channels, so
zeros count as they do in the resized program, whose constants (the original channel count) are kept.

The MLP-Mixer is the exception: its token-mixing MLP runs along the tokens with the channels as a batch axis, so
its biases reach every channel, the zero-padded ones too, and the next LayerNorm counts them. No variables can
undo that (the biases are shared by the kept channels), so ``trace_spec`` warns there
(:class:`ifjax._trace.PaddedChannelsWarning`) and the pruned Mixer is evaluated with ``resize``. With the
token-mixing biases zero the two agree again, which pins the cause.
"""

import warnings

import numpy as np
import pytest

import ifjax
from ifjax._spec import flatten, unflatten
from ifjax._trace import PaddedChannelsWarning

NORM_COUPLED = ["ViT", "ConvNeXt", "scan transformer", "flaxmodels GPT-2", "MLP-Mixer"]


def _traced(coverage_models, name):
  if name.startswith("flaxmodels"):
    pytest.importorskip("flaxmodels", reason="flaxmodels is a test extra: pip install -e '.[test]'")
  case = coverage_models.build(name)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    spec = ifjax.trace_spec(case.apply, case.variables, case.x)
  return case, spec, [w for w in caught if issubclass(w.category, PaddedChannelsWarning)]


@pytest.mark.parametrize("name", NORM_COUPLED)
def test_resize_is_keep_shapes_for_norm_coupled_groups(coverage_models, name):
  case, spec, padded = _traced(coverage_models, name)
  inexact = [g.name for g in spec.groups if not g.exact]
  assert inexact, name
  err, before, after = coverage_models.resize_error(case, spec, inexact)
  assert after < before
  if name != "MLP-Mixer":
    assert not padded and err < 1e-5, (name, err)
    return
  assert [str(w.message).split(":")[0] for w in padded] == ["group 'embed'"]
  assert "token_mlp/fc1/bias" in str(padded[0].message)
  assert err > 1e-3  # the biases reach the dropped channels: this is what the warning is about
  flat = {k: np.zeros_like(a) if "token_mlp" in k and k.endswith("/bias") else a
          for k, a in flatten(case.variables).items()}
  err, _, _ = coverage_models.resize_error(case._replace(variables=unflatten(flat)), spec, inexact)
  assert err < 1e-5, err
