"""DDP worker for tests/test_surgery.py: trains an STTP-converted model on two CPU ranks (gloo).

Run as ``python -m torch.distributed.run --nproc_per_node=2 --standalone tests/ddp_worker.py OUTFILE``. Each rank
trains on its half of a fixed batch; rank 0 writes every rank's final parameters (a flat float64 vector per rank
and case) to OUTFILE with ``torch.save``. The test process trains the same model on the whole batch in a single
process (:func:`train_single`) and compares.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_sttp.surgery import convert  # noqa: E402

STEPS = 3
LR = 0.2
BATCH = 8


def build_model(case: str = "one_forward") -> nn.Module:
    """A small float64 model without BatchNorm or dropout, converted with STTP (deterministic init); for the
    "sngan_d_reduced" case the reduced SNGAN-32 discriminator (its last layer, Linear(32, 1), has d_out = 1)."""
    torch.manual_seed(0)
    if case == "sngan_d_reduced":
        from torch_sttp.experiments.models import build_model as build_registered

        model = build_registered("sngan32-d-reduced").double()
        convert(model, method="sttp", rank=8, spectrum="normalized", init="random",
                generator=torch.Generator().manual_seed(1))
        return model
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 6, 12),
        nn.Tanh(),
        nn.Linear(12, 3),
    ).double()
    convert(model, method="sttp", rank=4, spectrum="free", init="random", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a non-trivial spectrum
        for name, p in model.named_parameters():
            if name.endswith("original2"):
                p.copy_(0.5 + torch.rand(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
    return model


def data(case: str = "one_forward"):
    g = torch.Generator().manual_seed(3)
    if case == "sngan_d_reduced":
        return (torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64),
                torch.randn(BATCH, generator=g, dtype=torch.float64), None, None)
    x1 = torch.randn(BATCH, 2, 6, generator=g, dtype=torch.float64)
    y1 = torch.randn(BATCH, 3, generator=g, dtype=torch.float64)
    x2 = torch.randn(BATCH, 2, 6, generator=g, dtype=torch.float64)
    y2 = torch.randn(BATCH, 3, generator=g, dtype=torch.float64)
    return x1, y1, x2, y2


def loss_fn(model, case: str, x1, y1, x2, y2) -> torch.Tensor:
    """Mean losses (DDP averages gradients over ranks, so equal halves reproduce the whole batch's gradient)."""
    loss = nn.functional.mse_loss(model(x1), y1)
    if case == "two_forwards":  # two forward passes before one backward
        loss = loss + nn.functional.mse_loss(model(x2), y2)
    return loss


def train(model, case: str, part: slice) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x1, y1, x2, y2 = data(case)
    for _ in range(STEPS):
        opt.zero_grad()
        x2p, y2p = (x2[part], y2[part]) if x2 is not None else (None, None)
        loss_fn(model, case, x1[part], y1[part], x2p, y2p).backward()
        opt.step()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_single(case: str) -> torch.Tensor:
    """Single-process reference: the same steps on the concatenated batch."""
    model = build_model(case)
    train(model, case, slice(None))
    return flat_params(model)


def main(outfile: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    half = BATCH // world
    part = slice(rank * half, (rank + 1) * half)
    results = {}
    # plain DDP (no find_unused_parameters): every parameter of a converted layer must take part in the graph
    for case, kwargs in (("one_forward", {}), ("two_forwards", {"static_graph": True}), ("sngan_d_reduced", {})):
        model = build_model(case)
        ddp = DDP(model, **kwargs)
        train(ddp, case, part)
        vec = flat_params(model)
        gathered = [torch.empty_like(vec) for _ in range(world)]
        dist.all_gather(gathered, vec)
        for r, v in enumerate(gathered):
            results[f"{case}/rank{r}"] = v
    if rank == 0:
        torch.save(results, outfile)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
