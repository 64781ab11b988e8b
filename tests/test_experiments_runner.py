"""The recipe runner: runs stopped by the 1637de1 recipes resume to the same metrics, planted pickles are refused
unexecuted, the metrics log, and the length of every function of the recipes and the CLI."""
from __future__ import annotations

import ast
import csv
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from torch_sttp.checkpoint import UnsafeCheckpointError
from torch_sttp.experiments import classify, gan
from torch_sttp.experiments.runner import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_1637de1" / "runs"
TIMING = {"elapsed_s", "sec_per_step", "wall_time"}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------- legacy run folders
# The commands of tests/fixtures/make_legacy_1637de1.py, without the stop, into another folder.
CLASSIFY_ARGS = ["--dataset", "digits8x8", "--model", "small-cnn", "--method", "sttp", "--rank", "4", "--steps", "6",
                 "--checkpoint-every", "3", "--eval-every", "3", "--batch", "16", "--threads", "1", "--no-progress"]
GAN_ARGS = ["--dataset", "mnist5k", "--ndf", "4", "--ngf", "8", "--d", "sttp-c", "--g", "plain", "--steps", "4",
            "--ckpt-every", "2", "--log-every", "1", "--metrics", "none", "--threads", "1", "--no-progress",
            "--batch-size", "8"]


def test_classify_run_stopped_by_1637de1_resumes_to_its_finished_metrics(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(LEGACY / "classify-stopped", out)
    assert [int(r["step"]) for r in _rows(out / "metrics.csv")] == [3]  # the old code stopped it half way
    assert classify.main(CLASSIFY_ARGS + ["--out", str(out)]) == 0
    assert _rows(out / "metrics.csv") == _rows(LEGACY / "classify-finished-metrics.csv")


def test_gan_run_stopped_by_1637de1_resumes_to_its_finished_metrics(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(LEGACY / "gan-stopped", out)
    assert "/tmp/legacyruns/gan" in (out / "config.yaml").read_text()  # written on another machine, other folder
    assert [int(r["step"]) for r in _rows(out / "metrics.csv")] == [1, 2]
    assert gan.main(GAN_ARGS + ["--out", str(out)]) == 0
    expected = _rows(LEGACY / "gan-finished-metrics.csv")
    assert [int(r["step"]) for r in expected] == [1, 2, 3, 4]
    resumed = _rows(out / "metrics.csv")
    assert resumed[:2] == expected[:2]  # the rows the old code wrote are kept as they were
    # the resumed steps run today's batched weight path, whose float32 rounding differs from 1637de1's layer-by-layer
    # products in the last digits (the two are equal to 1e-12 in float64: tests/test_weight_path.py)
    assert [r.keys() for r in resumed] == [r.keys() for r in expected]
    for got, want in zip(resumed[2:], expected[2:]):
        assert got["step"] == want["step"] and [k for k in got if got[k] == ""] == [k for k in want if want[k] == ""]
        for key in want:
            if key != "step" and want[key] != "":
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6, abs=1e-6), key
    assert f"out: {out}" in (out / "config.yaml").read_text()


# --------------------------------------------------------------------------------------------- planted pickles
def _plant(path: Path, marker: Path, form: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # unpickling the hook calls open(marker, "w"): a stand-in for arbitrary code execution
    hook = type("Hook", (), {"__reduce__": lambda self: (open, (str(marker), "w"))})()
    obj = {"version": 1, "step": 1, "config": {}, "G": {}, "D": {}, "hook": hook}
    if form == "torch_save":  # what the GAN recipe of 1637de1 wrote, and read back with weights_only=False
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)


GAN_TINY = dict(dataset="mnist5k", ngf=8, ndf=8, nz=8, batch_size=4, n_dis=1, steps=2, d_rank=4, g_rank=4,
                log_every=1, ckpt_every=1, metrics="none", progress=False, threads=1)


@pytest.mark.parametrize("form", ["torch_save", "raw_pickle"])
def test_gan_resume_refuses_a_planted_pickle_without_running_it(tmp_path, form):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    _plant(out / "checkpoint.pt", marker, form)
    with pytest.raises(UnsafeCheckpointError) as info:
        gan.run_gan(dict(GAN_TINY, d="sttp-c", out=str(out)))
    msg = str(info.value)
    assert str(out / "checkpoint.pt") in msg and "refusing" in msg and "nothing in it was executed" in msg, msg
    assert not marker.exists(), "the planted checkpoint ran code"
    with pytest.raises(UnsafeCheckpointError):
        gan.run_gan(dict(GAN_TINY, d="sttp-c", out=str(out), eval_only=True))
    assert not marker.exists(), "the planted checkpoint ran code"
    assert not (out / "metrics.csv").exists() and not (out / "summary.json").exists()
    if form == "torch_save":  # control: read the way the 1637de1 recipe read it, the file does run its code
        torch.load(out / "checkpoint.pt", weights_only=False)
        assert marker.exists()


def test_classify_resume_refuses_a_planted_pickle_without_running_it(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    _plant(out / "checkpoint.pt", marker, "torch_save")
    with pytest.raises(UnsafeCheckpointError):
        classify.run_classify(dataset="digits8x8", model="small-cnn", width=4, steps=1, threads=1, progress=False,
                              out=str(out))
    assert not marker.exists(), "the planted checkpoint ran code"


# ------------------------------------------------------------------------------------------------- metrics log
def test_metrics_log_keeps_rows_up_to_the_checkpoint_and_writes_every_digit(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv", ("step", "loss", "note"))
    assert log.start(keep_until=None) == [] and (tmp_path / "metrics.csv").read_text() == "step,loss,note\n"
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 0.1 * step, "other": "ignored"})
    assert [r["loss"] for r in log.rows()] == [repr(0.1), repr(0.2), repr(0.30000000000000004)]
    kept = log.start(keep_until=2)
    assert [r["step"] for r in kept] == ["1", "2"] and log.rows() == kept
    assert kept[0] == {"step": "1", "loss": "0.1", "note": ""}


# ---------------------------------------------------------------------------------------------- function length
def function_lengths(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(lines of code, "file:line name") of every function in ``path``; blank lines, comment-only lines and the
    docstring do not count. A nested function counts in its own entry and in its parent's."""
    source = path.read_text()
    skip = {i for i, line in enumerate(source.splitlines(), 1) if not line.strip() or line.strip().startswith("#")}
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        doc = set()
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            doc = set(range(body[0].lineno, body[0].end_lineno + 1))
        lines = [i for i in range(node.lineno, node.end_lineno + 1) if i not in skip and i not in doc]
        out.append((len(lines), f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return out


RECIPE_FILES = sorted((ROOT / "torch_sttp" / "experiments").glob("*.py")) + \
    [ROOT / "torch_sttp" / "checkpoint.py", ROOT / "torch_sttp" / "cli.py"]


def test_no_function_of_the_recipes_checkpoints_or_cli_is_longer_than_60_lines():
    lengths = [entry for path in RECIPE_FILES for entry in function_lengths(path)]
    assert len(lengths) > 100  # the files were read
    too_long = sorted(entry for entry in lengths if entry[0] > 60)
    assert not too_long, too_long


def test_function_lengths_counts_code_lines_only(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('def f(x):\n    """Doc\n    string."""\n    # a comment\n\n    y = x\n    return y\n')
    assert function_lengths(f, root=tmp_path) == [(3, "m.py:1 f")]


if __name__ == "__main__":  # list the longest functions
    for n, where in sorted((e for p in RECIPE_FILES for e in function_lengths(p)), reverse=True)[:15]:
        print(n, where)
