"""torch.compile (inductor) of converted paper models' training steps: compile time and compiled step time vs eager.

For each model (WRN-28-10 and SNGAN-32 D by default), converted with ``--method`` at rank ``--rank`` (forward paths
chosen per layer, as in training), one training step is: ``zero_grad``, forward, the loss mean(output²),
``loss.backward()``, an SGD update; the model is compiled with ``torch.compile(model)`` (inductor, default mode), the
optimizer step stays eager.

Protocol: the eager step is warmed up once; the compiled step's first three calls are timed one by one (the first
one traces and compiles forward and backward: its time minus the median eager step is the compile time printed;
a later call that is much slower than the rest is a recompilation); then ``--reps`` eager and compiled steps run
interleaved and their medians give the ratio compiled / eager. The inductor cache goes to a fresh temporary
directory (unless ``TORCHINDUCTOR_CACHE_DIR`` is set), so the compile times are those of a cold cache. After the
timing, the compiled and the eager twin (same initial parameters, same data) are checked to have computed the same
losses. With ``--dense`` the dense model is measured in the same way for comparison.

    python benchmarks/compile_step.py [--models wrn28-10,sngan32-d] [--method sttp] [--rank 16] [--batch 8]
                                      [--reps 5] [--threads 2] [--dense]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Callable

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # before torch is imported: a cold cache for this run only
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sttp-inductor-")

import torch  # noqa: E402

from harness import PAPER_MODELS, build, machine_lines, model_input, time_it  # noqa: E402


def sgd_step(model: torch.nn.Module, x: torch.Tensor, losses: list) -> Callable[[], None]:
    """zero_grad, forward, mean(output²), backward, SGD update; appends the loss to ``losses``."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    return step


def timed_call(fn: Callable[[], None]) -> float:
    """Wall time (seconds) of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(label: str, model: torch.nn.Module, x: torch.Tensor, reps: int) -> tuple[str, float]:
    """One result line: eager step, the compiled step's first calls, compile time, medians and their ratio; also
    returns the largest relative difference between the compiled and the eager losses."""
    twin = copy.deepcopy(model)
    eager_losses, compiled_losses = [], []
    eager = sgd_step(twin, x, eager_losses)
    torch._dynamo.reset()
    compiled = sgd_step(torch.compile(model), x, compiled_losses)
    eager()
    first = [timed_call(compiled) for _ in range(3)]
    eager_steps = [timed_call(eager) for _ in range(2)]
    times = time_it({"eager": eager, "compiled": compiled}, torch.device("cpu"), reps, 0)
    (t_eager, _, runs), (t_compiled, _, _) = times["eager"], times["compiled"]
    n = min(len(eager_losses), len(compiled_losses))
    diff = max(abs(a.item() - b.item()) / max(abs(b.item()), 1e-12)
               for a, b in zip(compiled_losses[:n], eager_losses[:n]))
    torch._dynamo.reset()
    line = (f"{label:<28} eager {t_eager * 1e3:9.1f} ms | compiled calls 1-3 "
            f"{' / '.join(f'{t:.1f}' for t in first)} s | compile ≈ {first[0] - t_eager:6.1f} s | "
            f"compiled {t_compiled * 1e3:9.1f} ms | compiled/eager {t_compiled / t_eager:5.2f} | "
            f"runs {runs} | eager steps before timing {' / '.join(f'{t * 1e3:.0f}' for t in eager_steps)} ms")
    return line, diff


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="wrn28-10,sngan32-d")
    parser.add_argument("--method", choices=["svdp", "sttp"], default="sttp")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed steps of each (default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense", action="store_true", help="also measure the dense models")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in PAPER_MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(PAPER_MODELS)}")
    if min(args.reps, args.threads, args.batch, args.rank) < 1:
        parser.error("--reps, --threads, --batch and --rank must be at least 1")
    torch.set_num_threads(args.threads)

    print("torch.compile (inductor) of converted training steps vs eager")
    print("\n".join(machine_lines(torch.device("cpu"))))
    print(f"inductor cache: {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    print(f"step: forward, mean(out²), backward, SGD; batch {args.batch}; {args.method.upper()} r={args.rank}, "
          f"path='auto'; medians of {args.reps} interleaved steps")
    print()
    for name in models:
        variants = ([(None, "dense")] if args.dense else []) + [(args.method, f"{args.method} r={args.rank}")]
        for method, tag in variants:
            model = build(name, method, args.rank, path="auto", init="identity")
            x = model_input(name, model, batch=args.batch)
            line, diff = measure(f"{PAPER_MODELS[name]} {tag}", model, x, args.reps)
            print(line, flush=True)
            print(f"{'':<28} compiled vs eager losses: largest relative difference {diff:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
