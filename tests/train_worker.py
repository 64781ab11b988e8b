"""Training worker for tests/test_checkpoint.py: a tiny converted model, SGD with momentum, random data.

    python tests/train_worker.py --dir DIR --steps 60 --every 10 [--resume] [--sleep 0.01] [--die-in-save STEP]

Every step draws its batch from torch's RNG and a noise scale from numpy's and python's, so resuming is only exact
if all three generator states are restored. After each checkpoint (``DIR/ckpt.pt``) it prints ``saved <step>`` and
flushes, so a test can kill it after a known checkpoint. ``--die-in-save STEP`` kills the process with SIGKILL in
the middle of writing the checkpoint of that step (half the file written). At the end the parameters go to
``DIR/final.pt``.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_sttp import checkpoint  # noqa: E402
from torch_sttp.surgery import convert  # noqa: E402


def build_model() -> nn.Module:
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Conv1d(2, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(36, 12), nn.Tanh(), nn.Linear(12, 3))
    return convert(model, "sttp", 4, "normalized", "noisy_identity", alpha=0.1)


def die_in_save_at(step_to_die: int):
    """Wrap torch.save so that the save of ``step_to_die`` writes half the bytes, then SIGKILLs the process."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj.get("state", {}).get("step") == step_to_die:
            import io

            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step")
    ap.add_argument("--die-in-save", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.die_in_save is not None:
        die_in_save_at(args.die_in_save)

    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpt = os.path.join(args.dir, "ckpt.pt")
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    start = 0
    if args.resume and os.path.exists(ckpt):
        state = checkpoint.load_training_state(ckpt, model, optimizer)
        start = state.step
        print(f"resumed {start}", flush=True)

    for step in range(start + 1, args.steps + 1):
        x = torch.randn(4, 2, 8)
        target = torch.randn(4, 3)
        scale = float(np.random.uniform(0.5, 1.5)) * random.uniform(0.5, 1.5)
        loss = (model(x) - scale * target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            checkpoint.save_training_state(ckpt, model, optimizer, step)
            print(f"saved {step}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)

    checkpoint.save_checkpoint(os.path.join(args.dir, "final.pt"), model=model.state_dict(), step=args.steps)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
