"""The weight path of converted paper models: time of all weights forward + backward against the three-GEMM floor,
and the operator calls it adds to a training step.

Timing (one ``TARGET`` line per case). For WRN-28-10, SNGAN-32 G, SNGAN-32 D, SNGAN-32 D reduced and SNGAN-48 D,
converted with SVDP and STTP at r ∈ {16, 64} with the normalized and the identity spectrum:

* **ours** — every converted weight formed inside one planner pass (``with torch_sttp.forward_pass(model)``,
  ``SpectralLayer.spectral_weight()``), then ``torch.autograd.backward`` of a fixed random ∂L/∂W into it, every
  ``.grad`` set to None first (as ``optimizer.zero_grad()`` leaves them in a training step);
* **floor** — the three GEMMs any method needs per layer: W = (UΣ)·Vᵀ, ∂L/∂(UΣ) = G·V and ∂L/∂Vᵀ = (UΣ)ᵀ·G at
  the layer's middle rank, each W dropped at once;
* **kept** (printed, not a goal) — the same GEMMs with every W kept until all gradients are formed, as ours and a
  training step must: on a CPU the floor's W all land in one reused, cache-warm buffer, the kept ones are written
  out to memory (and fault in fresh pages where the allocator returned them); "ours/kept" leaves that out.

"FLOP bound" (every case; ``harness.flop_bound``): the weight path's own FLOPs, forward + backward without padding
(the floor's GEMMs, every core's frame and, for STTP, each side's train contraction), over the floor's FLOPs: the
ratio ours could not beat even at the floor's FLOP rate, since the floor leaves out forming U and V. Where it exceeds
the goal, the TARGET line says so: no weight path of that form meets the goal against this floor.

Protocol: each case builds its model afresh (``harness.build`` collects the previous one first: a parametrized
module sits in reference cycles, and a dead model left to the collector makes the next case's allocations fault in
fresh pages); ours, floor and kept run interleaved after 2 warm-up runs, ``--reps`` timed runs each (default 15,
fewer once ``--budget`` seconds are spent on a case); ratio = median(ours) / median(floor), both from the same run. Goal
≤ 1.5 (≤ 2.0 for the SNGAN models at r = 16, where per-call overhead weighs most). On a GPU the figures are
printed, not verdicts: both sides are launch-bound there.

Operator calls (``--counts``, the default): a ``TorchDispatchMode`` counts the calls of one training step (forward,
``loss.backward()``, batch 1, ``path="dense"``, after one warm-up step), converted model minus dense model, for STTP
r = 16 and 64 and SVDP r = 64: all calls, and those that are not views. Goal ≤ 800 for the SNGAN models, ≤ 1600
for WRN-28-10 (pinned by tests/test_weight_path.py).

    python benchmarks/weights.py [--device cpu|cuda] [--models wrn28-10,sngan32-d] [--reps N] [--threads N]
                                 [--no-timing] [--no-counts] [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch

from harness import (PAPER_MODELS, build, gemm_floor_fn, machine_lines, flop_bound, time_it, weight_path_calls,
                     weights_fn)

COUNT_CASES = (("sttp", 16), ("sttp", 64), ("svdp", 64))
COUNT_GOAL = {"wrn28-10": 1600}  # every other paper model: 800


def time_goal(name: str, rank: int) -> float:
    return 2.0 if name.startswith("sngan") and rank == 16 else 1.5


def timing(args, device: torch.device) -> list[str]:
    """One line per case with both medians; returns the TARGET lines."""
    print(f"{'case':<42} {'ours ms':>9} {'floor ms':>9} {'ratio':>6} {'runs':>5} {'FLOP bound':>10} "
          f"{'kept ms':>8} {'ours/kept':>9}")
    targets = []
    for name in args.models:
        for rank in args.ranks:
            for method in ("svdp", "sttp"):
                for spectrum in ("normalized", "identity"):
                    model = build(name, method, rank, spectrum, device=device, init="identity")
                    times = time_it({"ours": weights_fn(model), "floor": gemm_floor_fn(model),
                                     "kept": gemm_floor_fn(model, keep=True)}, device, args.reps, 2, args.budget,
                                    args.clock)
                    (ours, _, runs), (floor, _, _), (kept, _, _) = times["ours"], times["floor"], times["kept"]
                    case = f"weights_{name}_{method}_r{rank}_{spectrum}"
                    ratio = ours / floor
                    bound = flop_bound(model)
                    print(f"{case:<42} {ours * 1e3:>9.2f} {floor * 1e3:>9.2f} {ratio:>6.2f} {runs:>5} {bound:>10.2f} "
                          f"{kept * 1e3:>8.2f} {ours / kept:>9.2f}", flush=True)
                    goal = time_goal(name, rank)
                    verdict = ("PASS" if ratio <= goal else "FAIL") if device.type == "cpu" else "(GPU: no verdict)"
                    note = " > goal: out of reach at the floor's FLOP rate" if bound > goal else ""
                    targets.append(f"TARGET {case} ratio={ratio:.2f} goal={goal} {verdict} (FLOP bound {bound:.2f}{note})")
                    del model  # collected by the next build()
    return targets


def counts(args, device: torch.device) -> list[str]:
    """The operator-call table; returns its TARGET lines."""
    header = " | ".join(f"{m.upper()} r={r}".center(17) for m, r in COUNT_CASES)
    print(f"{'model':<20} | {header}")
    print(f"{'':<20} | " + " | ".join(f"{'calls':>7} {'non-view':>9}" for _ in COUNT_CASES))
    targets = []
    for name in args.models:
        cells = []
        for method, rank in COUNT_CASES:
            calls, non_view = weight_path_calls(name, method, rank, device=device)
            cells.append(f"{calls:>7} {non_view:>9}")
            goal = COUNT_GOAL.get(name, 800)
            targets.append(f"TARGET calls_{name}_{method}_r{rank} ratio={calls / goal:.3f} goal=1.0 "
                           f"{'PASS' if calls <= goal else 'FAIL'} ({calls} calls of at most {goal}; "
                           f"{non_view} non-view)")
        print(f"{PAPER_MODELS[name]:<20} | " + " | ".join(cells), flush=True)
    return targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", default=",".join(PAPER_MODELS),
                        help=f"comma-separated registry names (default: {','.join(PAPER_MODELS)})")
    parser.add_argument("--ranks", default="16,64", help="comma-separated ranks of the timing cases")
    parser.add_argument("--reps", type=int, default=15, help="timed runs of ours and floor per case (default 15)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per case after which timing stops")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the process's CPU time (with --threads 1 on a shared machine)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-counts", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 timed runs per case (a smoke test)")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    unknown = [m for m in args.models if m not in PAPER_MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(PAPER_MODELS)}")
    if args.reps < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--reps and --threads must be at least 1")
    if args.quick:
        args.reps = min(args.reps, 3)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print("Weight path of converted paper models")
    print("\n".join(machine_lines(device)))
    print()
    targets = []
    if not args.no_counts:
        print("Operator calls the weight path adds to one training step (batch 1, path='dense', converted − dense):")
        targets += counts(args, device)
        print()
    if not args.no_timing:
        print(f"All weights forward + backward vs the three-GEMM floor (medians of {args.reps} interleaved runs, "
              f"{args.clock} clock):")
        targets += timing(args, device)
        print()
    print("\n".join(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
