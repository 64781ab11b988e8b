"""Speed and memory of converted models vs dense ones, measured in one run (ratios, not absolute times).

Targets (each printed as ``TARGET <name> ratio=<measured> goal=<bound> PASS|FAIL``):
  * wrn_weights_fwd_bwd_{svdp,sttp}: forming every WRN-28-10 weight from its parameters, forward + backward,
    r = 64, relative to a dense WRN-28-10 forward + backward at batch 64 on 32×32 inputs (goal ≤ 0.02);
  * wrn_train_step_{svdp,sttp}: a converted WRN-28-10 training step (paths chosen automatically) relative to the
    dense step (goal ≤ 1.0);
  * wrn_eval_cached_{svdp,sttp}: eval forward inside ``torch_sttp.cached(model)`` (factors reused across
    passes) relative to the dense eval forward (goal ≤ 1.05); the eval forward outside it (frames recomputed in
    every pass) is printed as ``wrn_eval_uncached_*`` without a goal;
  * linear4096_sttp_eval_speedup: nn.Linear(4096, 4096) time / STTP r = 64 factorized time, eval, batch 1,
    median of 200 forwards inside ``torch_sttp.cached`` (goal ≥ 5);
  * wrn_train_memory_{svdp,sttp}: peak RSS of a training step minus RSS after model construction, converted /
    dense, each in its own subprocess (goal ≤ 1.25).

    python benchmarks/surgery.py [--batch 64] [--width 10] [--depth 28] [--reps 3] [--skip-memory]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from harness import classification_step, gemm_floor_fn, weights_fn
from torch_sttp.experiments.models import WideResNet
from torch_sttp.modules import layer_state
from torch_sttp.surgery import cached, convert, converted_layers


def _median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _model(args, variant: str):
    gc.collect()  # the previous variant's converted model sits in reference cycles: free it first (see harness.build)
    torch.manual_seed(0)
    model = WideResNet(depth=args.depth, widen=args.width)
    if variant != "dense":
        convert(model, method=variant, rank=args.rank, spectrum="normalized")
    return model


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args, variant: str) -> None:
    model = _model(args, variant)
    step = classification_step(model, args.batch)
    base = _rss_bytes()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"MEMORY {peak - base}")


def _memory(args, variant: str) -> int:
    cmd = [sys.executable, __file__, "--memory-child", variant, "--batch", str(args.batch), "--width",
           str(args.width), "--depth", str(args.depth), "--rank", str(args.rank)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(next(line for line in out.splitlines() if line.startswith("MEMORY")).split()[1])


def _target(name: str, ratio: float, goal: float, lower_is_better: bool = True) -> None:
    ok = ratio <= goal if lower_is_better else ratio >= goal
    print(f"TARGET {name} ratio={ratio:.3f} goal={goal} {'PASS' if ok else 'FAIL'}")


def _dense_times(args) -> tuple[float, float, torch.Tensor]:
    """(dense training step, dense eval forward, the eval batch) in seconds, medians of ``--reps``."""
    dense = _model(args, "dense")
    dense_step = _median_time(classification_step(dense, args.batch), args.reps)
    x_eval = torch.randn(args.batch, 3, 32, 32)
    dense.eval()
    with torch.no_grad():
        dense_eval = _median_time(lambda: dense(x_eval), args.reps)
    print(f"dense: train step {dense_step:.3f} s, eval forward {dense_eval:.3f} s")
    return dense_step, dense_eval, x_eval


def _converted_targets(args, variant: str, dense_step: float, dense_eval: float, x_eval: torch.Tensor) -> None:
    """Weights, training step and eval (fresh and cached) of the converted WRN against the dense one."""
    model = _model(args, variant)
    weights = _median_time(weights_fn(model), max(args.reps, 11))  # ~0.2 s each: more repetitions are cheap
    floor = _median_time(gemm_floor_fn(model), max(args.reps, 11))
    step = _median_time(classification_step(model, args.batch), args.reps)
    model.eval()
    with torch.no_grad():
        eval_fresh = _median_time(lambda: model(x_eval), args.reps)
    with cached(model), torch.no_grad():
        evalt = _median_time(lambda: model(x_eval), args.reps)
    paths = {}
    for _, m in converted_layers(model):
        path = layer_state(m).last_path
        paths[path] = paths.get(path, 0) + 1
    print(f"{variant}: weights fwd+bwd {weights:.3f} s (their three GEMMs alone {floor:.3f} s), "
          f"train step {step:.3f} s, eval {eval_fresh:.3f} s (inside torch_sttp.cached {evalt:.3f} s), "
          f"paths {paths}")
    _target(f"wrn_weights_fwd_bwd_{variant}", weights / dense_step, 0.02)
    _target(f"wrn_train_step_{variant}", step / dense_step, 1.0)
    _target(f"wrn_eval_cached_{variant}", evalt / dense_eval, 1.05)
    print(f"wrn_eval_uncached_{variant}: ratio={eval_fresh / dense_eval:.3f} (frames recomputed every pass; "
          "no goal)")


def _linear_eval_target() -> None:
    """Batch-1 eval of a cached STTP r=64 Linear 4096² against the dense layer."""
    lin = torch.nn.Linear(4096, 4096).eval()
    conv = torch.nn.Linear(4096, 4096)
    convert(conv, method="sttp", rank=64, path="lowrank")
    conv.eval()
    x1 = torch.randn(1, 4096)
    with cached(conv), torch.no_grad():
        conv(x1)
        t_dense = _median_time(lambda: lin(x1), 200, warmup=10)
        t_ours = _median_time(lambda: conv(x1), 200, warmup=10)
    print(f"Linear 4096² eval batch 1: dense {t_dense * 1e6:.1f} µs, STTP r=64 {t_ours * 1e6:.1f} µs")
    _target("linear4096_sttp_eval_speedup", t_dense / t_ours, 5.0, lower_is_better=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.memory_child:
        memory_child(args, args.memory_child)
        return
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {platform.processor() or platform.machine()} | "
          f"torch {torch.__version__} | threads {torch.get_num_threads()} | WRN-{args.depth}-{args.width}, "
          f"batch {args.batch}, r={args.rank}")
    dense_step, dense_eval, x_eval = _dense_times(args)
    for variant in ("svdp", "sttp"):
        _converted_targets(args, variant, dense_step, dense_eval, x_eval)
    _linear_eval_target()
    if not args.skip_memory:
        base = _memory(args, "dense")
        for variant in ("svdp", "sttp"):
            mem = _memory(args, variant)
            print(f"{variant}: training-step memory {mem / 2**20:.0f} MiB vs dense {base / 2**20:.0f} MiB")
            _target(f"wrn_train_memory_{variant}", mem / base, 1.25)


if __name__ == "__main__":
    main()
