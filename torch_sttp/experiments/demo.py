"""The README demo: a small CNN on the bundled 5 000 MNIST digits, dense vs SVDP vs STTP.

Trains three copies of one small CNN (dense, SVDP and STTP with a learned, normalized spectrum) for the same number
of epochs on CPU and prints, for each, the number of parameters that move the weights, the compression Z (paper
eq. 11, in percent of the dense model) and the test accuracy.

    python -m torch_sttp.experiments.demo [--epochs 3] [--rank 16] [--width 16]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..report import compression
from ..surgery import convert, converted_layers
from .data import load_mnist5k
from .models import SmallCNN, state_dict_numel


def _accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return correct / total


def _train(model, train_loader, epochs: int, lr: float, desc: str) -> float:
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    steps = epochs * len(train_loader)
    bar = tqdm(total=steps, desc=desc, unit="step", leave=True)
    model.train()
    for _ in range(epochs):
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16, help="rank cap r of SVDP/STTP")
    parser.add_argument("--width", type=int, default=16, help="base width of the CNN")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train = load_mnist5k(split="train", seed=args.seed)
    test = load_mnist5k(split="test", seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=args.batch, shuffle=True, generator=gen)
    test_loader = DataLoader(test, batch_size=500)
    print(f"MNIST 5k: {len(train)} train / {len(test)} test digits; SmallCNN(width={args.width}), "
          f"{args.epochs} epochs, rank cap r={args.rank}")

    rows = []
    for variant in ("dense", "svdp", "sttp"):
        torch.manual_seed(args.seed)
        model = SmallCNN(width=args.width)
        if variant != "dense":
            convert(model, method=variant, rank=args.rank, spectrum="normalized", init="noisy_identity")
        seconds = _train(model, train_loader, args.epochs, args.lr, desc=f"{variant:>5}")
        acc = _accuracy(model, test_loader)
        if variant == "dense":
            params, z = state_dict_numel(model), 100.0
        else:
            params = sum(p.dof for p in (m.parametrizations["weight"][0] for _, m in converted_layers(model)))
            z = compression(model)
        rows.append({"variant": variant, "weight_dof": params, "z": z, "accuracy": acc, "seconds": seconds})

    print()
    print(f"{'model':<7}{'DOF of converted weights':>26}{'Z (%)':>9}{'test acc':>10}{'train s':>9}")
    for row in rows:
        dof = "—" if row["variant"] == "dense" else f"{row['weight_dof']:,}"
        print(f"{row['variant']:<7}{dof:>26}{row['z']:>9.1f}{100 * row['accuracy']:>9.1f}%{row['seconds']:>9.1f}")
    print("Z: parameters (DOF + everything not reparameterized, BatchNorm statistics included) relative to the "
          "dense model.")
    return rows


if __name__ == "__main__":
    main()
