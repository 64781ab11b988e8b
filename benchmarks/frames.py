"""Forward+backward cost of Householder frames against a GEMM baseline with the same FLOP count.

For each batch shape (B, n, r) three workloads are timed, each as one forward pass plus the backward pass of
``output.sum()`` through autograd:

* ``ours``  — ``torch_sttp.frames.householder_frame(params)`` (compact WY form, hand-written backward);
* ``same``  — the same-FLOP GEMM reference: ``G = YᵀY; Q = Y·(G·G)`` on a random Y of the same shape, i.e.
  2nr² + r³ multiply-adds forward and 3nr² + 2r³ backward, the products ``ours`` makes (YᵀY, T·Y_topᵀ and
  Y·X forward; Yᵀ·∂Q, two r×r×r and two n×r×r products backward) without forming T, so the ratio ours/same
  measures overhead;
* ``gemm``  — the earlier reference ``G = YᵀY; Q = Y·G`` (5nr², no r³ term), printed so that ratios stay comparable
  with older runs; it has fewer FLOPs than ``ours`` by the factor 1 + 3r/(5n) (1.30 at n = 2r);
* ``hprod`` — ``torch.linalg.householder_product`` on the same reflectors (its CPU backward is very slow, so it
  gets few repetitions and ``--quick`` skips it for the tallest shape, n = 5760).

Protocol: each timing is the median of ``--reps`` (default 30) timed runs after 3 warm-up runs, at ``--threads``
(default 2) intra-op threads, wall time (``--clock cpu``: the process's CPU time, which on a shared machine with
``--threads 1`` leaves out the time spent waiting for a core); ours and gemm are run interleaved (ours, gemm, ours,
gemm, …) so that changes in machine load affect both alike, and the ratio is taken between the two medians of one
run. One ``TARGET`` line per
shape reports ours/same against the goal of 1.25 (CPU; on a GPU the figures are printed, the verdict is not
meaningful: both sides are launch-bound).

    python benchmarks/frames.py [--device cpu|cuda] [--dtype float32|float64|bfloat16] [--reps N] [--threads N]
                                [--clock wall|cpu] [--quick] [--no-hprod]
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from harness import load_average, machine_lines, time_it
from torch_sttp.frames import frame_mask, householder_frame

SHAPES = [(1, 5760, 64), (8, 640, 64), (64, 128, 64)]
GOAL = 1.25
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def make_workloads(b: int, n: int, r: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = (torch.randn(b, n, r, generator=gen, dtype=torch.float64) / n**0.5).to(dtype).to(device)
    params.requires_grad_(True)
    y_gemm = (torch.randn(b, n, r, generator=gen, dtype=torch.float64) / n**0.5).to(dtype).to(device)
    y_gemm.requires_grad_(True)

    # householder_product takes the reflectors with the implicit unit diagonal and τ = 2/‖y‖².
    mask = frame_mask(n, r, device=device, dtype=dtype)
    eye = torch.eye(n, r, dtype=dtype, device=device)

    def ours_fwd() -> torch.Tensor:
        return householder_frame(params)

    def gemm_fwd() -> torch.Tensor:
        gram = y_gemm.mT @ y_gemm
        return y_gemm @ gram

    def same_fwd() -> torch.Tensor:
        gram = y_gemm.mT @ y_gemm
        return y_gemm @ (gram @ gram)

    def hprod_fwd() -> torch.Tensor:
        y = params * mask + eye
        tau = 2.0 / (y * y).sum(dim=-2)
        return torch.linalg.householder_product(y, tau)

    def fwd_only(f: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                f()

        return run

    def fwd_bwd(f: Callable[[], torch.Tensor], leaf: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            leaf.grad = None
            f().sum().backward()

        return run

    return {
        "ours": (fwd_only(ours_fwd), fwd_bwd(ours_fwd, params), ours_fwd),
        "gemm": (fwd_only(gemm_fwd), fwd_bwd(gemm_fwd, y_gemm), gemm_fwd),
        "same": (fwd_only(same_fwd), fwd_bwd(same_fwd, y_gemm), same_fwd),
        "hprod": (fwd_only(hprod_fwd), fwd_bwd(hprod_fwd, params), hprod_fwd),
    }


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"


def measure_shape(work: dict, device: torch.device, args, skip_hprod: bool) -> dict:
    """Time one shape's workloads (ours, same, gemm interleaved; hprod apart); returns the ratio and the table row."""
    names = ("ours", "same", "gemm")
    fwd = time_it({k: work[k][0] for k in names[:2]}, device, args.reps, 3, args.budget, args.clock)
    fwd_bwd = time_it({k: work[k][1] for k in names}, device, args.reps, 3, args.budget, args.clock)
    (ours_f, _, _), (same_f, _, _) = fwd["ours"], fwd["same"]
    (ours_fb, ours_min, _), (same_fb, same_min, _), (gemm_fb, _, _) = (fwd_bwd[k] for k in names)
    ratio = ours_fb / same_fb
    hprod_fb, note, diff = hprod_timing(work, device, args, skip_hprod)
    hp_ratio = "n/a" if hprod_fb is None else f"{hprod_fb / ours_fb:.1f}x"
    line = (f"{fmt_ms(ours_f):>9} {fmt_ms(same_f):>9} | {fmt_ms(ours_fb):>9} {fmt_ms(same_fb):>9} {ratio:>6.2f} "
            f"{ours_min / same_min:>6.2f} | {fmt_ms(gemm_fb):>9} {ours_fb / gemm_fb:>6.2f} | {fmt_ms(hprod_fb):>10} "
            f"{hp_ratio:>10} | {diff:>15}" + (f"   hprod: {note}" if note else ""))
    return {"ratio": ratio, "line": line}


def hprod_timing(work: dict, device: torch.device, args, skip: bool):
    """(householder_product f+b seconds or None, a note, max |ours − hprod| as text)."""
    hprod_fb, note, max_diff = None, "", None
    try:
        with torch.no_grad():
            max_diff = (work["ours"][2]().float() - work["hprod"][2]().float()).abs().max().item()
        if skip:
            note = "skipped"
        else:
            hprod_fb, _, runs = time_it({"hprod": work["hprod"][1]}, device, args.hprod_reps, 1, args.budget)["hprod"]
            note = f"{runs} run{'s' if runs > 1 else ''}"
    except RuntimeError as exc:  # e.g. no householder_product kernel for this dtype/device
        note = f"unsupported ({str(exc).splitlines()[0][:60]})"
    return hprod_fb, note, "n/a" if max_diff is None else f"{max_diff:.1e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions for ours and gemm (default 30)")
    parser.add_argument(
        "--hprod-reps", type=int, default=3, help="timed repetitions for householder_product (default 3)"
    )
    parser.add_argument(
        "--budget", type=float, default=20.0, help="seconds of timed runs after which a measurement stops early"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the process's CPU time (with --threads 1 on a shared machine)")
    parser.add_argument(
        "--quick", action="store_true", help="skip householder_product for the tallest shape (its backward is slow)"
    )
    parser.add_argument("--no-hprod", action="store_true", help="skip householder_product's timing (a smoke run)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.hprod_reps < 1 or args.threads < 1:
        parser.error("--reps, --hprod-reps and --threads must be at least 1")

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)

    print(f"Householder frames: forward + backward (gradient of sum), median {args.clock} time")
    print("\n".join(machine_lines(device)))
    print(f"device:  {device}   dtype: {args.dtype}   reps: {args.reps} interleaved after 3 warm-up runs "
          f"(householder_product: {args.hprod_reps})")
    print()

    # householder_product's CPU backward grows with n far faster than the GEMMs: the tallest frame is the slow one.
    largest = max(SHAPES, key=lambda s: s[1])
    header = (
        f"{'B':>4} {'n':>6} {'r':>4} | {'ours fwd':>9} {'same fwd':>9} | {'ours f+b':>9} {'same f+b':>9} "
        f"{'ratio':>6} {'(min)':>6} | {'gemm f+b':>9} {'/gemm':>6} | {'hprod f+b':>10} {'hprod/ours':>10} "
        f"| {'max|ours-hprod|':>15}"
    )
    print("times in ms (medians); ratio = ours f+b / same f+b (the same-FLOP reference), (min) = the same from the")
    print("fastest runs; /gemm = ours f+b / gemm f+b (the earlier 5nr² reference); hprod = torch.linalg.householder_product")
    print(header)
    print("-" * len(header))

    targets = []
    for b, n, r in SHAPES:
        row = measure_shape(make_workloads(b, n, r, dtype, device), device, args,
                            skip_hprod=args.no_hprod or (args.quick and (b, n, r) == largest))
        print(f"{b:>4} {n:>6} {r:>4} | {row['line']}")
        targets.append((b, n, r, row["ratio"]))

    print(f"load at end: {load_average()}")
    print()
    for b, n, r, ratio in targets:
        ratio_2 = round(ratio, 2)
        verdict = "PASS" if ratio_2 <= GOAL else "FAIL"
        print(f"TARGET frames_fwd_bwd_B{b}_n{n}_r{r} ratio={ratio_2:.2f} goal={GOAL} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
