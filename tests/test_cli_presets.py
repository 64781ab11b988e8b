"""Every recipe preset under configs/ starts through the installed ``sttp`` entry point, for one step.

Presets whose data is bundled or generated locally (digits8x8, MNIST 5k, MNIST-1D; the adapter tasks' MiniLM and
pydoc sentences) train one step and end with their summary line (adapter presets also write their adapters);
those that need CIFAR-10 or STL-10 files are pointed at an empty data folder and must end with one
line saying where to put the data, exit status 2, and no run folder. Each preset runs in its own subprocess; the
subprocesses run two at a time (their start-up, importing torch, is most of their cost).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="the presets are YAML files (pip install pyyaml)")

from torch_sttp.checkpoint import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*/*.yaml"))
NEEDS_FILES = {"cifar10": "cifar-10-batches-bin", "stl10": "stl10_binary"}


def _entry_point() -> str:
    beside = Path(sys.executable).with_name("sttp")
    found = str(beside) if beside.is_file() else shutil.which("sttp")
    if found is None:
        pytest.fail("the sttp entry point is not installed (pip install -e .)")
    return found


def _command(preset: Path, work: Path) -> list[str]:
    recipe = preset.parent.name  # configs/classify, configs/gan, configs/adapt
    cmd = [_entry_point(), "train", recipe, "--config", str(preset), "--steps", "1", "--no-progress",
           "--out", str(work / "run")]
    if recipe == "gan":
        cmd += ["--metrics", "none"]
    elif recipe == "adapt":
        # the step and its evaluations on small subsets; the vision backbone pretrained for 1 epoch, not 4
        cmd += ["--device", "cpu", "--max-train", "64", "--max-eval", "48", "--pretrain-epochs", "1"]
    else:
        cmd += ["--device", "cpu"]  # the WRN preset asks for CUDA
    if _dataset(preset) in NEEDS_FILES:
        cmd += ["--data-root", str(work / "empty-data")]
    return cmd


def _dataset(preset: Path) -> str:
    settings = yaml.safe_load(preset.read_text()) or {}
    return settings["dataset"] if preset.parent.name != "adapt" else settings["task"]


def _run(preset: Path, work: Path) -> subprocess.CompletedProcess:
    work.mkdir(parents=True)
    (work / "empty-data").mkdir()
    env = dict(os.environ)
    env.pop("TORCH_STTP_DATA", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run(_command(preset, work), cwd=work, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every preset run once: {preset name: (work folder, completed process)}."""
    base = tmp_path_factory.mktemp("presets")
    works = {p: base / f"{p.parent.name}-{p.stem}" for p in PRESETS}
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {p: pool.submit(_run, p, works[p]) for p in PRESETS}
        return {f"{p.parent.name}/{p.name}": (works[p], f.result()) for p, f in done.items()}


def test_every_recipe_has_presets():
    assert {p.parent.name for p in PRESETS} == {"classify", "gan", "adapt"} and len(PRESETS) >= 34
    assert {_dataset(p) for p in PRESETS if p.parent.name == "adapt"} == {"text", "vision"}


@pytest.mark.parametrize("preset", [p for p in PRESETS if _dataset(p) not in NEEDS_FILES],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_trains_one_step(results, preset):
    work, proc = results[f"{preset.parent.name}/{preset.name}"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    run = work / "run"
    assert lines and lines[-1].endswith(f"run folder {run}"), proc.stdout
    assert " after 1/1 " in lines[-1], lines[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary.get("step" if preset.parent.name == "gan" else "steps") == 1
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 1
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[0] == "1"
    if preset.parent.name == "adapt":
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        wanted = yaml.safe_load(preset.read_text())
        assert (config["kind"], config["rank"]) == (wanted["kind"], wanted["rank"])
        assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
        assert 0 < summary["trainable_params"] < summary["total_params"]


@pytest.mark.parametrize("preset", [p for p in PRESETS if _dataset(p) in NEEDS_FILES],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_without_its_data_says_where_to_put_it(results, preset):
    work, proc = results[f"{preset.parent.name}/{preset.name}"]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("sttp: error: dataset "), proc.stderr
    expected = work / "empty-data" / NEEDS_FILES[_dataset(preset)]
    assert str(expected) in lines[0] and "--data-root" in lines[0] and "$TORCH_STTP_DATA" in lines[0]
    assert proc.stdout == "" and not (work / "run").exists()
