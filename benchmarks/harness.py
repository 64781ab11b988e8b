"""Shared measurement tools of the benchmarks: the machine description, interleaved timing, the weight path's
forward + backward and its three-GEMM floor, operator calls of a training step, CUDA kernel counts.

Imported by ``frames.py``, ``weights.py``, ``surgery.py`` and ``gpu_check.sh`` (and by the tests that pin the
operator counts). Run on its own, it prints the machine description.
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torch_sttp
from torch_sttp.experiments.models import build_model
from torch_sttp.cost import weight_path_flops
from torch_sttp.surgery import converted_layers, forward_pass, spectral_parametrization

# the paper models of the weight-path measurements: registry name -> label
PAPER_MODELS = {"wrn28-10": "WRN-28-10", "sngan32-g": "SNGAN-32 G", "sngan32-d": "SNGAN-32 D",
                "sngan32-d-reduced": "SNGAN-32 D reduced", "sngan48-d": "SNGAN-48 D"}


# ------------------------------------------------------------------------------------------------------ machine
def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def machine_lines(device: torch.device) -> list[str]:
    """date, machine, os, python/torch/threads (and the GPU) as printed at the top of a benchmark's output."""
    lines = [f"date:    {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
             f"machine: {cpu_model()} ({platform.machine()}, {cpu_count()} cores available)",
             f"os:      {platform.platform()}",
             f"python:  {platform.python_version()}   torch: {torch.__version__}   threads: {torch.get_num_threads()}"]
    if device.type == "cuda":
        lines.append(f"gpu:     {torch.cuda.get_device_name(device)}")
    lines.append(f"load:    {load_average()} (1/5/15-min load average at start; other processes skew timings)")
    return lines


# ------------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_it(fns: dict[str, Callable[[], None]], device: torch.device, reps: int, warmup: int,
            budget_s: float = float("inf"), clock: str = "wall") -> dict[str, tuple[float, float, int]]:
    """Median and minimum time (seconds) of each function over up to ``reps`` runs after ``warmup`` runs.

    The functions are run interleaved (a, b, a, b, …) so that a change in machine load hits all of them alike.
    Timed runs stop early once ``budget_s`` seconds have been spent on them (each function is timed at least once).
    ``clock``: "wall" (elapsed time) or "cpu" (the process's CPU time: on a shared machine, with one thread, it
    leaves out the time the process waits for a core). Returns {name: (median, minimum, number of timed runs)}.
    """
    now = CLOCKS[clock]
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    for i in range(reps):
        if i > 0 and spent >= budget_s:
            break
        for name, fn in fns.items():
            synchronize(device)
            start = now()
            fn()
            synchronize(device)
            elapsed = now() - start
            times[name].append(elapsed)
            spent += elapsed
    return {name: (statistics.median(t), min(t), len(t)) for name, t in times.items()}


# -------------------------------------------------------------------------------------------------- weight path
def weights_fn(model: torch.nn.Module) -> Callable[[], None]:
    """Every converted weight formed from its parameters, then backpropagated from a fixed gradient ∂L/∂W.

    In a training step ∂L/∂W arrives from the layer's own backward; a fixed random tensor stands in for it, so the
    timing covers exactly the weight path (frames, contractions, U·Σ·Vᵀ) forward and backward, in one planner pass.
    Each run starts as a step does after ``optimizer.zero_grad()`` (every ``.grad`` None, PyTorch's default), so
    the gradients are stored, not added to those of the previous run.
    """
    layers = [m for _, m in converted_layers(model)]
    params = list(model.parameters())
    device = params[0].device
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(spectral_parametrization(m).weight_shape, generator=generator).to(device) for m in layers]

    def run():
        for p in params:
            p.grad = None
        with forward_pass(model):  # as inside a forward pass of the model: frames batched across layers
            weights = [m.spectral_weight() for m in layers]
        torch.autograd.backward(weights, grads)

    return run


def gemm_floor_fn(model: torch.nn.Module, keep: bool = False) -> Callable[[], None]:
    """The three GEMMs every weight needs at least (W = (UΣ)·Vᵀ, then ∂/∂(UΣ) and ∂/∂Vᵀ), nothing else.

    ``keep``: every W is formed first and kept until all gradients are formed, as in a training step (and in
    :func:`weights_fn`); otherwise each W is dropped at once, so that one reused, cache-warm buffer takes them all.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ops = []
    for _, m in converted_layers(model):
        p = spectral_parametrization(m)
        ops.append(tuple(torch.randn(*shape, generator=generator).to(device)
                         for shape in ((p.d_out, p.r_mid), (p.r_mid, p.d_in), (p.d_out, p.d_in))))

    def run():
        for us, vt, grad in ops:
            us @ vt
            grad @ vt.mT
            us.mT @ grad

    def run_kept():
        weights = [us @ vt for us, vt, _ in ops]
        for us, vt, grad in ops:
            grad @ vt.mT
            us.mT @ grad
        del weights

    return run_kept if keep else run


def flop_bound(model: torch.nn.Module) -> float:
    """Weight-path FLOPs / floor FLOPs of a converted model (:func:`torch_sttp.cost.weight_path_flops`, summed over
    its layers): the ratio to the three-GEMM floor that ours could not beat even at the floor's FLOP rate, since
    the floor leaves out forming U and V (their frames and, for STTP, their train contractions)."""
    floor = ours = 0.0
    for _, m in converted_layers(model):
        layer_floor, layer_ours = weight_path_flops(spectral_parametrization(m))
        floor, ours = floor + layer_floor, ours + layer_ours
    return ours / floor

# ---------------------------------------------------------------------------------------------- operator calls
VIEW_LIKE = {"aten._unsafe_view.default", "aten._reshape_alias.default"}


class CallCounter(TorchDispatchMode):
    """Counts the operator calls that reach the dispatcher (what a kernel launch may follow): all of them, and
    those that are not views (an op whose output aliases its input: view, transpose, slice, detach, …)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.non_view = 0
        self.by_name: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        name = str(func)
        if not func.is_view and name not in VIEW_LIKE:
            self.non_view += 1
        self.by_name[name] = self.by_name.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def model_input(name: str, model: torch.nn.Module, batch: int = 1, device="cpu") -> torch.Tensor:
    """A random input for a registered model: latent codes for generators, images for the others."""
    generator = torch.Generator().manual_seed(0)
    if hasattr(model, "nz"):
        return torch.randn(batch, model.nz, generator=generator).to(device)
    size = 48 if name.startswith("sngan48") else 32
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


def build(name: str, method: str | None = None, rank: int = 64, spectrum: str = "normalized", path: str = "dense",
          device="cpu", init: str = "noisy_identity") -> torch.nn.Module:
    """A registered model, converted (``method`` not None) with the given settings, on ``device``.

    Models the caller has dropped are collected first: a parametrized module sits in reference cycles (through
    torch.nn.utils.parametrize's injected class and the frame planner), and a dead model left to the collector
    makes the next model's allocations fault in fresh pages (measured: ~25 000 minor faults and +40 % CPU time
    per WRN-28-10 weight pass).
    """
    gc.collect()
    torch.manual_seed(0)
    model = build_model(name).to(device)
    if method is not None:
        torch_sttp.convert(model, method=method, rank=rank, spectrum=spectrum, path=path, init=init)
    return model


def training_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training step without the optimizer: forward, a scalar loss, ``loss.backward()``."""

    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().sum().backward()

    return step


def classification_step(model: torch.nn.Module, batch: int, device="cpu") -> Callable[[], None]:
    """One SGD step of a 10-class classifier on random 32×32 images (cross-entropy)."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def step_calls(model: torch.nn.Module, x: torch.Tensor) -> CallCounter:
    """The operator calls of one training step (after one warm-up step)."""
    step = training_step(model, x)
    step()
    counter = CallCounter()
    with counter:
        step()
    return counter


def weight_path_calls(name: str, method: str, rank: int, spectrum: str = "normalized",
                      device="cpu") -> tuple[int, int]:
    """(calls, non-view calls) the weight path adds to one training step of a registered model: the converted
    model's step (batch 1, ``path="dense"``) minus the dense model's."""
    dense = build(name, device=device)
    converted = build(name, method, rank, spectrum, device=device, init="identity")
    x = model_input(name, dense, device=device)
    a, b = step_calls(dense, x), step_calls(converted, x)
    return b.calls - a.calls, b.non_view - a.non_view


def cuda_kernels(fn: Callable[[], None]) -> int:
    """Number of CUDA kernels one call of ``fn`` launches (torch.profiler; after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


if __name__ == "__main__":
    print("\n".join(machine_lines(torch.device("cpu"))))
