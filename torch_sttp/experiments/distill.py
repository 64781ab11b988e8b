"""Short distillation of a compressed model towards its dense original on unlabeled inputs.

    >>> history = distill(student, teacher, batches, steps=200, lr=1e-4, loss="cosine", on="outputs")

Each step runs the teacher (no grad) and the student on the same batch and minimises the distance between their
outputs (``on="outputs"``) or between the outputs of named submodules (``on="hidden"``, e.g. the transformer
blocks). Only the student's trainable parameters (or the ``params`` given) change; the teacher is left untouched.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import run_batch

__all__ = ["LOSSES", "SCHEDULES", "TARGETS", "distill", "first_tensor", "schedule_factor"]

LOSSES = ("mse", "cosine")
TARGETS = ("outputs", "hidden")
SCHEDULES = ("constant", "cosine")


def first_tensor(output) -> torch.Tensor:
    """The tensor a module's output stands for: itself, ``last_hidden_state`` of a model output, or the first
    tensor of a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) or hasattr(output, "last_hidden_state"):
        if getattr(output, "last_hidden_state", None) is not None:
            return output.last_hidden_state
        values = output.values() if isinstance(output, Mapping) else []
        for v in values:
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(output, (tuple, list)):
        for v in output:
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"cannot find a tensor in a {type(output).__name__} output; pass select=")


def _distance(a: torch.Tensor, b: torch.Tensor, loss: str) -> torch.Tensor:
    a = a.float()
    b = b.float()
    if loss == "mse":
        return F.mse_loss(a, b)
    return (1.0 - F.cosine_similarity(a.flatten(0, -2) if a.dim() > 1 else a[None],
                                      b.flatten(0, -2) if b.dim() > 1 else b[None], dim=-1)).mean()


class _Capture:
    """Forward hooks that keep the outputs of named submodules."""

    def __init__(self, model: nn.Module, names: Sequence[str], select: Callable):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"hidden_modules not found in the model: {missing}")
        for n in names:
            self.handles.append(modules[n].register_forward_hook(self._hook(n, select)))

    def _hook(self, name, select):
        def hook(_module, _inputs, output):
            self.outputs[name] = select(output)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _cycle(inputs: Iterable):
    """Endless batches: re-iterates a re-iterable (list, DataLoader), replays the batches of a one-shot iterator."""
    if iter(inputs) is not inputs:
        while True:
            empty = True
            for batch in inputs:
                empty = False
                yield batch
            if empty:
                raise ValueError("inputs_iterable yielded no batch")
    seen = []
    for batch in inputs:
        seen.append(batch)
        yield batch
    if not seen:
        raise ValueError("inputs_iterable yielded no batch")
    yield from itertools.cycle(seen)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    inputs_iterable: Iterable,
    steps: int,
    lr: float,
    loss: str = "mse",
    on: str = "outputs",
    hidden_modules: Sequence[str] | None = None,
    select: Callable | None = None,
    params: Iterable[torch.Tensor] | None = None,
    weight_decay: float = 0.0,
    clip_grad: float | None = 1.0,
    schedule: str = "constant",
    dropout: bool = False,
    progress: bool = True,
    log_every: int = 10,
) -> dict:
    """Fine-tune ``student`` to match ``teacher`` on unlabeled batches; returns ``{"loss": [...], "seconds": s}``.

    Args:
        inputs_iterable: batches — a tensor (``model(x)``), a tuple/list (``model(*b)``) or a dict (``model(**b)``);
            cycled until ``steps`` steps ran (a one-shot iterator's batches are kept and replayed).
        steps, lr: Adam steps and learning rate (``weight_decay`` gives AdamW).
        loss: ``"mse"`` or ``"cosine"`` (1 − cosine similarity along the last axis, averaged over the rest).
        on: ``"outputs"`` — compare the models' outputs; ``"hidden"`` — compare the outputs of the submodules named in
            ``hidden_modules`` (same names in both models), losses averaged.
        select: maps a model/submodule output to the tensor compared (default :func:`first_tensor`).
        params: what to train (default: every student parameter with ``requires_grad``).
        clip_grad: global gradient-norm clip (None: off).
        schedule: the learning rate of step k = 0 … steps − 1: ``"constant"`` lr, or ``"cosine"``
            lr·½(1 + cos(π·k/steps)) (no warm-up).
        dropout: run the student in train mode (dropout on); by default it is kept in eval mode so that the only
            difference from the teacher is the compression. The models' modes are restored afterwards.
    """
    _check_arguments(student, teacher, steps, lr, loss, on, hidden_modules, schedule)
    select = select or first_tensor
    params = [p for p in (student.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    history = {"loss": [], "seconds": 0.0, "steps": steps}
    if steps == 0:
        return history
    optimizer = (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if weight_decay
                 else torch.optim.Adam(params, lr=lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: schedule_factor(schedule, k, steps))
    modes = (student.training, teacher.training)
    student.train(dropout)
    teacher.eval()
    caps = []
    if on == "hidden":
        caps = [_Capture(student, hidden_modules, select), _Capture(teacher, hidden_modules, select)]
    bar = _progress_bar(steps) if progress else None
    start = time.perf_counter()
    try:
        batches = _cycle(inputs_iterable)
        for step in range(steps):
            value = _loss(student, teacher, next(batches), caps, hidden_modules if on == "hidden" else None,
                          select, loss)
            _update(optimizer, value, params, clip_grad)
            scheduler.step()
            history["loss"].append(float(value.detach()))
            if bar is not None:
                bar.update(1)
                if step % max(log_every, 1) == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{history['loss'][-1]:.4g}")
            for c in caps:
                c.outputs.clear()
    finally:
        for c in caps:
            c.close()
        if bar is not None:
            bar.close()
        student.train(modes[0])
        teacher.train(modes[1])
    history["seconds"] = time.perf_counter() - start
    return history


def _progress_bar(steps: int):
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="distill", unit="step")


def _update(optimizer: torch.optim.Optimizer, value: torch.Tensor, params: list, clip_grad: float | None) -> None:
    """One optimizer step on ``value``'s gradient, its global norm clipped to ``clip_grad``."""
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()


def schedule_factor(schedule: str, step: int, steps: int) -> float:
    """The factor of the learning rate at ``step`` (0 … steps − 1): 1 (``"constant"``) or
    ½(1 + cos(π·step/steps)) (``"cosine"``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    return 1.0 if schedule == "constant" else 0.5 * (1.0 + math.cos(math.pi * step / steps))


def _check_arguments(student, teacher, steps, lr, loss, on, hidden_modules, schedule) -> None:
    """Raise ValueError for arguments :func:`distill` cannot use."""
    schedule_factor(schedule, 0, 1)  # raises for an unknown schedule
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    if on not in TARGETS:
        raise ValueError(f"unknown target {on!r}; choose one of {TARGETS}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if on == "hidden" and not hidden_modules:
        raise ValueError("on='hidden' needs hidden_modules=[names of submodules present in both models]")
    if student is teacher:
        raise ValueError("student and teacher are the same module; distil a compressed copy")


def _loss(student, teacher, batch, caps, hidden_modules, select, loss: str) -> torch.Tensor:
    """The distance between the student's and the teacher's outputs on ``batch`` (or, with ``hidden_modules``,
    the mean distance between those submodules' outputs, captured by ``caps``)."""
    with torch.no_grad():
        t_out = run_batch(teacher, batch)
        targets = ([caps[1].outputs[n].detach() for n in hidden_modules] if hidden_modules
                   else [select(t_out).detach()])
    del t_out
    s_out = run_batch(student, batch)
    preds = [caps[0].outputs[n] for n in hidden_modules] if hidden_modules else [select(s_out)]
    return sum(_distance(p, t, loss) for p, t in zip(preds, targets)) / len(preds)
