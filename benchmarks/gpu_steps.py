"""Training steps of converted paper models against dense ones, and the kernels of one converted step — the
figures of ``benchmarks/gpu_check.sh`` (printed, no verdicts).

* ``steps``: a WRN-28-10 classification step (cross-entropy, SGD; batch 64, 32×32) and an SNGAN-32 GAN step (a
  hinge-loss D step on real and generated images, then a G step; Adam; batch 64), dense and converted (SVDP and
  STTP, r = 64, forward paths chosen automatically); medians of interleaved runs.
* ``kernels``: CUDA kernels launched by one training step (batch 1, ``path="dense"``) of the dense and the
  converted models (torch.profiler); on a CPU the dispatcher's operator calls stand in for them.

    python benchmarks/gpu_steps.py steps|kernels [--device cuda|cpu] [--quick] [--reps N]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from harness import build, classification_step, cuda_kernels, model_input, step_calls, time_it, training_step


def gan_step(d, g, batch: int, device):
    real = torch.randn(batch, 3, 32, 32, device=device)
    z = torch.randn(batch, g.nz, device=device)
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.0, 0.9))
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.0, 0.9))

    def step():
        opt_d.zero_grad(set_to_none=True)
        fake = g(z).detach()
        (F.relu(1 - d(real)).mean() + F.relu(1 + d(fake)).mean()).backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        (-d(g(z)).mean()).backward()
        opt_g.step()

    return step


def steps(args, device) -> None:
    batch = 2 if args.quick else 64
    variants = ["sttp"] if args.quick else ["svdp", "sttp"]
    for label, make in (
        ("wrn28-10", lambda method: classification_step(build("wrn28-10", method, 64, path="auto", device=device,
                                                   init="identity"), batch, device)),
        ("sngan32-d+g", lambda method: gan_step(build("sngan32-d", method, 64, path="auto", device=device,
                                                      init="identity"),
                                                build("sngan32-g", method, 64, path="auto", device=device,
                                                      init="identity"), batch, device)),
    ):
        dense = make(None)
        for method in variants:
            times = time_it({"dense": dense, method: make(method)}, device, args.reps, 0 if args.quick else 1)
            ours, base = times[method][0], times["dense"][0]
            print(f"{label} {method}: step {ours * 1e3:.1f} ms, dense {base * 1e3:.1f} ms, ratio {ours / base:.2f} "
                  f"(batch {batch}, r=64, medians of {times[method][2]} interleaved runs)", flush=True)


def kernels(args, device) -> None:
    for name in ("sngan32-d",) if args.quick else ("wrn28-10", "sngan32-d", "sngan32-g"):
        cells = []
        for method in (None, "sttp") if args.quick else (None, "svdp", "sttp"):
            model = build(name, method, 64, device=device, init="identity")
            x = model_input(name, model, device=device)
            if device.type == "cuda":
                cells.append(f"{method or 'dense'} {cuda_kernels(training_step(model, x))} kernels")
            else:
                counter = step_calls(model, x)
                cells.append(f"{method or 'dense'} {counter.calls} calls ({counter.non_view} non-view)")
        print(f"{name} r=64 one training step (batch 1, path='dense'): " + ", ".join(cells), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["steps", "kernels"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="batch 2, STTP only, one timed run without warm-up, kernels of SNGAN-32 D only "
                             "(a smoke test)")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if args.quick:
        args.reps = 1
    device = torch.device(args.device)
    (steps if args.section == "steps" else kernels)(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
