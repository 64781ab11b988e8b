"""Crash safety of :mod:`torch_sttp.checkpoint`: kill/resume gives the same parameters bit for bit, damaged files
raise CheckpointError, an interrupted save keeps the previous file, and malicious pickles are refused unexecuted."""
from __future__ import annotations

import io
import os
import pickle
import random
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from torch_sttp import checkpoint
from torch_sttp.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from torch_sttp.surgery import convert

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "train_worker.py"
STEPS, EVERY = 60, 10


# ------------------------------------------------------------------------------------------------------ helpers
def _worker(directory: Path, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(WORKER), "--dir", str(directory), "--steps", str(STEPS), "--every", str(EVERY), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            **popen)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{out}\n{err}"
    return out


def assert_identical(a, b, where="state") -> None:
    """Bit-for-bit equality of nested plain data (tensors compared with torch.equal, dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ (max |Δ| = {(a - b).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 2))
    return convert(model, "sttp", 3, "normalized", "noisy_identity", alpha=0.1)


def _train(model, optimizer, steps: int) -> None:
    for _ in range(steps):
        x, y = torch.randn(5, 6), torch.randn(5, 2)
        scale = float(np.random.uniform(0.5, 1.5)) * random.uniform(0.5, 1.5)
        loss = (model(x) - scale * y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference_final(tmp_path_factory):
    """Parameters after an uninterrupted run of the worker; the run starts at once and is awaited on first use, so
    it overlaps with the interrupted run of the first test."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    proc = _worker(directory)
    result = {}

    def get():
        if not result:
            out = _finish(proc)
            assert out.strip().endswith("done")
            result["model"] = load_checkpoint(directory / "final.pt")["model"]
        return result["model"]

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


# ------------------------------------------------------------------------------------------- kill and resume
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, reference_final):
    proc = _worker(tmp_path, "--sleep", "0.02")
    seen = []
    for line in proc.stdout:  # kill right after the checkpoint of step 20 was written
        seen.append(line.strip())
        if line.strip() == "saved 20":
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, seen)
    assert not (tmp_path / "final.pt").exists(), "the worker finished before it was killed"
    saved = load_checkpoint(tmp_path / "ckpt.pt")
    assert 20 <= saved["step"] < STEPS

    out = _finish(_worker(tmp_path, "--resume"))
    assert out.splitlines()[0] == f"resumed {saved['step']}"
    assert_identical(load_checkpoint(tmp_path / "final.pt")["model"], reference_final())


def test_sigkill_inside_a_save_keeps_the_previous_checkpoint(tmp_path, reference_final):
    """SIGKILL with half of the step-40 checkpoint written: ckpt.pt is still the complete step-30 file."""
    proc = _worker(tmp_path, "--die-in-save", "40")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
    assert out.split() == ["saved", "10", "saved", "20", "saved", "30"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1, leftovers  # the half-written temporary file, never renamed over ckpt.pt
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / leftovers[0])
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 30

    out = _finish(_worker(tmp_path, "--resume"))
    assert out.splitlines()[0] == "resumed 30"
    assert_identical(load_checkpoint(tmp_path / "final.pt")["model"], reference_final())


@pytest.mark.parametrize("opt", ["sgd_momentum", "adam"])
def test_in_process_resume_is_bit_identical(tmp_path, opt):
    make = {"sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[opt]
    seeds = lambda: (torch.manual_seed(1), np.random.seed(1), random.seed(1))  # noqa: E731

    model = _tiny_model()
    optimizer = make(model.parameters())
    seeds()
    _train(model, optimizer, 30)
    expected = model.state_dict()

    model = _tiny_model()
    optimizer = make(model.parameters())
    seeds()
    _train(model, optimizer, 12)
    save_training_state(tmp_path / "ckpt.pt", model, optimizer, 12, extra={"note": "epoch 1", "best": 0.5})
    _train(model, optimizer, 5)  # work lost to the "crash", and RNG draws that must be rewound

    model = _tiny_model()
    optimizer = make(model.parameters())
    seeds()
    torch.randn(100)  # the fresh process's RNGs are elsewhere
    state = load_training_state(tmp_path / "ckpt.pt", model, optimizer)
    assert state.step == 12 and state.extra == {"note": "epoch 1", "best": 0.5}
    _train(model, optimizer, 30 - state.step)
    assert_identical(model.state_dict(), expected)


def test_rng_states_round_trip():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    random.gauss(0, 1)  # python keeps a cached gaussian
    np.random.standard_normal()
    state = checkpoint.rng_state()
    draws = lambda: (torch.randn(4), np.random.standard_normal(3), random.gauss(0, 1), random.random())  # noqa: E731
    first = draws()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    checkpoint.set_rng_state(torch.load(buf, weights_only=True))
    second = draws()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2:] == second[2:]


# ----------------------------------------------------------------------------------------- damaged files
def _saved(tmp_path) -> Path:
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, optimizer, 2)
    path = tmp_path / "ckpt.pt"
    save_training_state(path, model, optimizer, 2)
    return path


def _assert_damaged_message(err: CheckpointError, path: Path) -> None:
    msg = str(err)
    assert str(path) in msg and "truncated or corrupted" in msg and "previous" in msg, msg


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -1])
def test_truncated_checkpoint_raises_checkpoint_error(tmp_path, keep):
    path = _saved(tmp_path)
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    _assert_damaged_message(info.value, path)
    with pytest.raises(CheckpointError):
        load_training_state(path, _tiny_model(), None)


def test_corrupted_checkpoint_raises_checkpoint_error(tmp_path):
    """A flipped byte inside a tensor's data (which torch.load alone reads back silently) is detected."""
    model = _tiny_model()
    path = tmp_path / "ckpt.pt"
    marker = torch.arange(64, dtype=torch.float32) + 0.5  # easy to find in the archive
    save_checkpoint(path, model=model.state_dict(), marker=marker)
    data = bytearray(path.read_bytes())
    pos = data.find(marker.numpy().tobytes())
    assert pos > 0
    data[pos + 17] ^= 0x01
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["state"]["marker"], marker)  # torch alone: no error
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    _assert_damaged_message(info.value, path)


def test_byte_flips_anywhere_never_load_different_data(tmp_path):
    """Flip bytes at 150 spread-out positions: each load either raises CheckpointError or returns the saved data."""
    path = tmp_path / "ckpt.pt"
    state = {"w": torch.linspace(-1, 1, 40), "step": 7, "opt": {"lr": 0.1, "buf": torch.ones(3, 2)}}
    save_checkpoint(path, **state)
    data = path.read_bytes()
    bad = tmp_path / "bad.pt"
    outcomes = {"error": 0, "same": 0}
    for pos in np.linspace(0, len(data) - 1, 150).astype(int):
        flipped = bytearray(data)
        flipped[pos] ^= 0xA5
        bad.write_bytes(bytes(flipped))
        try:
            loaded = load_checkpoint(bad)
        except CheckpointError:
            outcomes["error"] += 1
            continue
        assert_identical(loaded, state, f"byte {pos}")
        outcomes["same"] += 1  # the byte was zip padding or metadata that the reader does not use
    assert outcomes["error"] > 50, outcomes


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


# ------------------------------------------------------------------------------------------ interrupted save
def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, step=1, w=torch.ones(50))
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:100])  # part of the file is written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, step=2, w=torch.zeros(50))
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert_identical(load_checkpoint(path), {"step": 1, "w": torch.ones(50)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"], "temporary file left behind"


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt.pt", step=1)
    assert list(tmp_path.iterdir()) == []


def test_unsaveable_values_are_refused_before_writing(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, step=1)
    before = path.read_bytes()
    for bad in [np.arange(3), np.float32(1.0), object(), {"k": lambda: 0}, {(1, 2): 3}, torch.ones(2).to_sparse()]:
        with pytest.raises(TypeError, match="save_checkpoint"):
            save_checkpoint(path, step=2, value=bad)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_plain_values_round_trip(tmp_path):
    state = {
        "tensors": OrderedDict(a=torch.randn(3, 2), b=torch.tensor(True), c=torch.zeros(0, 4, dtype=torch.float64),
                               d=torch.arange(6, dtype=torch.bfloat16), e=torch.tensor(2 + 1j)),
        "numbers": [1, -2.5, float("inf"), True, None, "text", b"raw", (1, (2, 3))],
        "meta": {"dtype": torch.float16, "device": torch.device("cpu"), "size": torch.Size([2, 3]), 7: "int key"},
    }
    save_checkpoint(tmp_path / "c.pt", **state)
    assert_identical(load_checkpoint(tmp_path / "c.pt"), state)


def test_saved_file_is_readable_by_plain_weights_only_torch_load(tmp_path):
    model = _tiny_model()
    save_checkpoint(tmp_path / "c.pt", model=model.state_dict())
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format"] == "torch_sttp.checkpoint"
    assert_identical(raw["state"]["model"], model.state_dict())


# ------------------------------------------------------------------------------------------ malicious pickle
class _Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path: Path, marker: Path, form: str) -> None:
    obj = {"model": {"weight": torch.ones(2)}, "step": 1, "hook": _Payload(str(marker))}
    if form == "torch_zip":
        torch.save(obj, path)
    elif form == "legacy_pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:  # a checkpoint written by save_checkpoint, with the payload spliced into its state
        torch.save({"format": "torch_sttp.checkpoint", "version": 1, "sha256": "0" * 64, "state": obj}, path)


@pytest.mark.parametrize("form", ["torch_zip", "legacy_pickle", "fake_header"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, form):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    _malicious(path, marker, form)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert isinstance(info.value, CheckpointError) and str(path) in msg and "refusing" in msg, msg
    assert not marker.exists(), "the payload ran"
    with pytest.raises(UnsafeCheckpointError):
        load_training_state(path, _tiny_model(), None)
    assert not marker.exists(), "the payload ran"


def test_malicious_payload_is_live(tmp_path):
    """Control: the same file loaded the unsafe way does run the payload (so the test above is meaningful)."""
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    _malicious(path, marker, "torch_zip")
    torch.load(path, weights_only=False)
    assert marker.exists()
