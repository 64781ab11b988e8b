"""Adapters under DDP and FSDP2 (``fully_shard``) on two CPU ranks (gloo) equal one process, float64, to 1e-10.

Run as a script by ``torch.distributed.run`` (see :func:`run_ranks`), this file is also the worker: each rank trains
the adapted model on its half of a fixed batch and writes its final trainable tensors to a file of its own.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch_sttp  # noqa: E402

STEPS = 3
LR = 0.2
BATCH = 8
CASES = [("principal", "sttp"), ("delta", "svdp"), ("rotation", "svdp")]


def build_model(kind: str, method: str) -> nn.Module:
    """A float64 conv → linear model with an adapter on every layer except the head, which trains whole."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(24, 12), nn.Tanh(),
                          nn.Linear(12, 3)).double()
    torch_sttp.add_adapters(model, kind, method, rank=4, target=["0", "3"], trainable="5", seed=1,
                            two_sided=kind == "rotation")
    with torch.no_grad():  # away from init, so that every adapter tensor has a gradient at step 1
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 2, 6, generator=g, dtype=torch.float64), torch.randn(BATCH, 3, generator=g,
                                                                                  dtype=torch.float64)


def train(model: nn.Module, part: slice) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    x, y = data()
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[part]), y[part]).backward()  # a mean: equal halves average to the whole
        opt.step()


def trainable_vector(model: nn.Module) -> torch.Tensor:
    tensors = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters() if p.requires_grad]
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def train_single(kind: str, method: str) -> torch.Tensor:
    model = build_model(kind, method)
    train(model, slice(None))
    return trainable_vector(model)


def worker(mode: str, outfile: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {}
    for kind, method in CASES:
        model = build_model(kind, method)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            train(DistributedDataParallel(model), part)
        else:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
            assert all(hasattr(p, "full_tensor") for p in model.parameters())  # every parameter is sharded
            train(model, part)
        results[kind] = trainable_vector(model)
    torch.save(results, f"{outfile}.rank{rank}")  # each rank its own file
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(mode: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    for _ in range(3):  # the standalone rendezvous can lose a race for its port on a busy machine
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                               __file__, mode, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        if proc.returncode == 0 or "rendezvous" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r: torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1)}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(mode, tmp_path):
    results = run_ranks(mode, tmp_path / f"{mode}.pt")
    for kind, method in CASES:
        r0, r1 = results[0][kind], results[1][kind]
        assert torch.equal(r0, r1), kind
        single = train_single(kind, method)
        assert not torch.allclose(single, trainable_vector(build_model(kind, method)))
        torch.testing.assert_close(r0, single, rtol=0, atol=1e-10)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
