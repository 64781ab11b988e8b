"""The two adapter fine-tuning tasks: their data, models and adapter targets (shared by ``sttp train adapt`` and
``benchmarks/adapters.py``).

* **text** — all-MiniLM-L6-v2 (masked mean pooling, a new linear head) classifies sentences of Python's bundled
  documentation (``pydoc_data.topics``) by topic: the :data:`N_TOPICS` topics with most sentences after dropping
  every sentence that occurs in more than one topic; a seeded 60/20/20 split per topic (train / val / test),
  tokenized to at most :data:`MAX_LENGTH` tokens. Adapters go on the 36 encoder Linear layers.
* **vision** — the MNIST-5k ``SmallCNN`` (width 16) trained on digits 0–4 (:func:`pretrained_cnn`), then adapted
  to digits 5–9: adapters on conv1–3 and fc, and a new trainable 5-way head on fc's 10 outputs.

A :class:`Task` holds each split as tensors (``inputs`` dict, labels); the model factory gives a fresh, seeded
model whose pretrained part is identical for every seed.
"""
from __future__ import annotations

import copy
import random
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["N_TOPICS", "MAX_LENGTH", "TEXT_TARGETS", "VISION_TARGETS", "TASKS", "topic_sentences", "split_indices",
           "TextClassifier", "VisionClassifier", "Task", "text_task", "pretrained_cnn", "vision_task", "make_task",
           "adapter_targets"]

N_TOPICS = 20
MAX_LENGTH = 128
TASKS = ("text", "vision")
#: The 36 encoder Linear layers of MiniLM as one regular expression (PEFT's ``target_modules`` form).
TEXT_TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|" \
               r"intermediate\.dense|output\.dense)$"
#: The adapted layers of the SmallCNN backbone.
VISION_TARGETS = ("conv1", "conv2", "conv3", "fc")


# ------------------------------------------------------------------------------------------------------------ data
def topic_sentences(n_topics: int = N_TOPICS) -> tuple[list[str], list[int], list[str]]:
    """(sentences, labels, topic names): the ``n_topics`` topics of ``pydoc_data.topics`` with most sentences,
    after dropping every sentence that occurs in more than one topic (``specialnames`` repeats most of
    ``customization``); topics ordered by sentence count (ties by name)."""
    from pydoc_data.topics import topics

    from .minilm import split_sentences

    per_topic = {k: list(dict.fromkeys(split_sentences(v))) for k, v in topics.items()}
    counts = Counter(s for sentences in per_topic.values() for s in sentences)
    unique = {k: [s for s in v if counts[s] == 1] for k, v in per_topic.items()}
    names = sorted(unique, key=lambda k: (-len(unique[k]), k))[:n_topics]
    sentences = [s for k in names for s in unique[k]]
    labels = [i for i, k in enumerate(names) for _ in unique[k]]
    return sentences, labels, names


def split_indices(labels: list[int], seed: int = 0, fractions=(0.6, 0.2)) -> dict[str, list[int]]:
    """A seeded train / val / test split within each class (``fractions`` of train and val; the rest is test)."""
    rng = random.Random(seed)
    out = {"train": [], "val": [], "test": []}
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(idx)
        n_train, n_val = round(fractions[0] * len(idx)), round(fractions[1] * len(idx))
        out["train"] += idx[:n_train]
        out["val"] += idx[n_train:n_train + n_val]
        out["test"] += idx[n_train + n_val:]
    return out


# ---------------------------------------------------------------------------------------------------------- models
class TextClassifier(nn.Module):
    """MiniLM encoder, masked mean pooling, a linear head: (B, L) token ids and mask -> (B, n_classes) logits."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        """logits = head(Σ_t m_t h_t / Σ_t m_t), h the encoder's last hidden states (B, L, 384)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))


class VisionClassifier(nn.Module):
    """A pretrained SmallCNN (10 outputs) followed by a new 5-way head: (B, 1, 28, 28) -> (B, 5)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        """logits = head(backbone(x))."""
        return self.head(self.backbone(x))


class Task:
    """A task's splits ``data[split] = (inputs: {name: tensor}, labels)``, its seeded model factory
    ``make_model(seed)`` and its default batch size and epochs."""

    def __init__(self, name: str, make_model: Callable[[int], nn.Module], data: dict, batch_size: int,
                 epochs: float):
        self.name, self.make_model, self.data = name, make_model, data
        self.batch_size, self.epochs = batch_size, epochs

    def size(self, split: str) -> int:
        """The number of samples of ``split``."""
        return int(self.data[split][1].shape[0])

    def batch(self, split: str, idx: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """(inputs, labels) of the samples ``idx`` of ``split``; token inputs cut to the batch's longest sentence
        (the padding beyond it is masked out anyway)."""
        inputs, labels = self.data[split]
        batch = {k: v[idx] for k, v in inputs.items()}
        if "attention_mask" in batch:
            width = max(1, int(batch["attention_mask"].sum(1).max()))
            batch = {k: v[:, :width] for k, v in batch.items()}
        return batch, labels[idx]

    def batches(self, split: str, seed: int | None = None, batch_size: int | None = None):
        """The batches of ``split`` in order (or in a random order seeded with ``seed``), ``batch_size`` each."""
        n = self.size(split)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if seed is not None else \
            torch.arange(n)
        bs = batch_size or self.batch_size
        for i in range(0, n, bs):
            yield self.batch(split, order[i:i + bs])


def _first(idx: list[int], limit: int | None) -> list[int]:
    return idx[:limit] if limit else idx


def text_task(max_train: int | None = None, max_eval: int | None = None) -> Task:
    """The text task; ``max_train`` / ``max_eval`` keep the first samples of the train / val and test splits."""
    from .minilm import load_minilm

    encoder, tokenizer = load_minilm()
    sentences, labels, _ = topic_sentences()
    data = {}
    for split, idx in split_indices(labels).items():
        idx = _first(idx, max_train if split == "train" else max_eval)
        batch = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                          return_tensors="pt")
        data[split] = ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                       torch.tensor([labels[i] for i in idx]))

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return TextClassifier(copy.deepcopy(encoder), N_TOPICS).train()

    return Task("text", make_model, data, batch_size=16, epochs=3)


def _train_cnn(x: torch.Tensor, y: torch.Tensor, epochs: int) -> dict:
    """A SmallCNN(10) trained with Adam (1e-3, batch 64, seeded orders) on (x, y); its state_dict."""
    from .models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(10).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.state_dict()


def pretrained_cnn(cache: Path | None = None, epochs: int = 4) -> dict:
    """State of a SmallCNN trained ``epochs`` epochs on digits 0–4 of MNIST-5k's train split (seeded, so the same
    every time on one machine); read from / written to ``cache/smallcnn_digits0-4-e<epochs>.pt`` when given."""
    from ..checkpoint import load_checkpoint, save_checkpoint
    from .data import load_mnist5k

    path = Path(cache) / f"smallcnn_digits0-4-e{epochs}.pt" if cache is not None else None
    if path is not None and path.is_file():
        return load_checkpoint(path, map_location="cpu")["model"]
    x, y = load_mnist5k(split="train").tensors
    keep = y < 5
    state = _train_cnn(x[keep], y[keep], epochs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, model=state, epochs=epochs)
    return state


def vision_task(cache: Path | None = None, pretrain_epochs: int = 4, max_train: int | None = None,
                max_eval: int | None = None) -> Task:
    """The vision task: digits 5–9 of MNIST-5k's train split (seeded 80/20 train / val) and of its test split,
    labels 0–4; the backbone from :func:`pretrained_cnn`."""
    from .data import load_mnist5k
    from .models import SmallCNN

    state = pretrained_cnn(cache, pretrain_epochs)
    x, y = load_mnist5k(split="train").tensors
    keep = y >= 5
    xs, ys = x[keep], y[keep] - 5
    parts = split_indices(ys.tolist(), fractions=(0.8, 0.2))
    tx, ty = load_mnist5k(split="test").tensors
    parts["train"], parts["val"] = _first(parts["train"], max_train), _first(parts["val"], max_eval)
    data = {s: ({"x": xs[parts[s]]}, ys[parts[s]]) for s in ("train", "val")}
    test = torch.nonzero(ty >= 5).flatten()[:max_eval or None]
    data["test"] = ({"x": tx[test]}, ty[test] - 5)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        backbone = SmallCNN(10)
        backbone.load_state_dict(state)
        return VisionClassifier(backbone).train()

    return Task("vision", make_model, data, batch_size=32, epochs=3)


def make_task(name: str, cache: Path | None = None, pretrain_epochs: int = 4, max_train: int | None = None,
              max_eval: int | None = None) -> Task:
    """:func:`text_task` or :func:`vision_task` by name (``cache`` and ``pretrain_epochs``: vision only)."""
    if name == "text":
        return text_task(max_train, max_eval)
    if name == "vision":
        return vision_task(cache, pretrain_epochs, max_train, max_eval)
    raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")


def adapter_targets(task: str) -> dict:
    """``add_adapters`` keyword arguments selecting a task's adapted layers (``target``, ``exclude``)."""
    if task == "text":
        return {"target": nn.Linear, "exclude": ["encoder.pooler.*", "head"]}
    return {"target": [f"backbone.{n}" for n in VISION_TARGETS]}
