"""Classification recipe and sweep: smoke runs, exact resume, logs, config files, missing data."""
from __future__ import annotations

import argparse
import csv
import json
import os

import numpy as np
import pytest
import torch

from torch_sttp.checkpoint import load_checkpoint
from torch_sttp.experiments import classify, sweep
from torch_sttp.experiments.data import DatasetFilesNotFoundError

TINY = dict(dataset="digits8x8", model="small-cnn", width=4, batch=32, eval_batch=1000, threads=1, progress=False)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------------- smoke
@pytest.mark.parametrize("method", classify.METHODS)
def test_smoke_each_method_writes_csv_and_json(tmp_path, method):
    s = classify.run_classify(dict(TINY, method=method, rank=2, steps=3, eval_every=2, out=str(tmp_path),
                                   penalty="d_optimal" if method == "sttp" else "none", penalty_weight=1e-3))
    assert s["status"] == "complete" and s["steps"] == 3 and int(s) == 0
    assert 0.0 <= s["accuracy"] <= 1.0 and s["wall_time_s"] > 0
    if method in ("svdp", "sttp"):
        assert s["z"] < 100.0 and s["dof"] < s["dense_params"]
    else:
        assert s["z"] == 100.0 and s["dof"] == s["dense_params"]

    with open(tmp_path / "metrics.csv", newline="") as f:
        assert next(csv.reader(f)) == list(classify.METRIC_COLUMNS)
    rows = _csv(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [2, 3]
    assert float(rows[-1]["test_acc"]) == pytest.approx(s["accuracy"])
    assert (rows[-1]["penalty"] != "") == (method == "sttp")

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(classify.SUMMARY_KEYS) <= set(saved)
    assert saved["accuracy"] == s["accuracy"] and saved["z"] == s["z"] and saved["dof"] == s["dof"]
    assert json.loads((tmp_path / "config.json").read_text())["method"] == method

    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 3 and {"model", "optimizer", "scheduler", "rng", "config"} <= set(state)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_smoke_mnist1d_cnn1d(tmp_path):
    s = classify.run_classify(dataset="mnist1d", model="cnn1d", width=8, method="sttp", rank=4, steps=3, batch=32,
                              threads=1, progress=False, out=str(tmp_path))
    assert s["status"] == "complete" and s["z"] < 100.0 and s["model"] == "cnn1d"


def test_wrn_on_cifar_files_from_data_root(tmp_path):
    """The CIFAR-10 path end to end on a few fake records in the official binary layout (uint8 data, augmentation)."""
    folder = tmp_path / "data" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, size=(4, 3073), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, size=4)
        rec.tofile(folder / name)
    s = classify.run_classify(dataset="cifar10", data_root=str(tmp_path / "data"), model="wrn", depth=10, widen=1,
                              method="sttp", rank=4, steps=2, batch=8, augment=True, optimizer="sgd", lr=0.1,
                              weight_decay=1e-4, threads=1, progress=False, out=str(tmp_path / "run"))
    assert s["status"] == "complete" and s["z"] < 100.0


# ------------------------------------------------------------------------------------------------------ resume
def _state(out):
    return load_checkpoint(out / "checkpoint.pt")


def _assert_same_run(a, b):
    sa, sb = _state(a), _state(b)
    assert sa["step"] == sb["step"]
    assert sa["model"].keys() == sb["model"].keys()
    for k, v in sa["model"].items():
        if torch.is_tensor(v):
            assert torch.equal(v, sb["model"][k]), k
        else:  # extra state of the parametrizations
            assert v == sb["model"][k], k
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), (i, k)
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"]
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    if sa["regularizer"] is not None:
        for k, v in sa["regularizer"]["running_max"].items():
            assert torch.equal(v, sb["regularizer"]["running_max"][k])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(_csv(a / "metrics.csv")) == strip(_csv(b / "metrics.csv"))
    ja, jb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    for k in ("accuracy", "test_loss", "train_loss", "best_accuracy", "z", "dof", "steps"):
        assert ja[k] == jb[k], k


@pytest.mark.parametrize("settings", [
    dict(method="sttp", rank=3, penalty="d_optimal", penalty_weight=1e-2, augment=True),  # linear schedule
    dict(method="sr", sr_every=2, optimizer="sgd", lr=0.05, weight_decay=1e-3, schedule="cosine", warmup=2),
], ids=["sttp-augment-penalty", "sr-sgd"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, settings):
    n = 4
    cfg = dict(TINY, steps=2 * n, eval_every=3, checkpoint_every=100, **settings)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    classify.run_classify(cfg, out=str(straight))
    first = classify.run_classify(cfg, out=str(resumed), stop_at=n)
    assert first["status"] == "interrupted" and first["steps"] == n
    assert not (resumed / "summary.json").exists() and _state(resumed)["step"] == n
    second = classify.run_classify(cfg, out=str(resumed))
    assert second["status"] == "complete" and second["steps"] == 2 * n
    _assert_same_run(straight, resumed)


def test_n_steps_then_extended_to_2n_equals_2n_straight(tmp_path):
    """A finished N-step run continued to 2N (constant schedule) equals a 2N-step run, also the CSV rows lost
    after the checkpoint of an interrupted run are dropped on resume."""
    n = 3
    cfg = dict(TINY, method="svdp", rank=2, schedule="constant", eval_every=1)
    classify.run_classify(cfg, steps=2 * n, out=str(tmp_path / "straight"))
    classify.run_classify(cfg, steps=n, out=str(tmp_path / "resumed"))
    with open(tmp_path / "resumed" / "metrics.csv", "a") as f:  # a row logged after the checkpoint, then lost
        f.write("99,9,0,0,0,,0,0,0\n")
    classify.run_classify(cfg, steps=2 * n, out=str(tmp_path / "resumed"))
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    import signal

    cfg = dict(TINY, method="sttp", rank=2, steps=6, eval_every=2, checkpoint_every=100)
    classify.run_classify(cfg, out=str(tmp_path / "straight"))
    evaluate, calls = classify.evaluate, []

    def evaluate_then_signal(*a, **k):  # SIGTERM arrives during the evaluation after step 2
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*a, **k)

    monkeypatch.setattr(classify, "evaluate", evaluate_then_signal)
    s = classify.run_classify(cfg, out=str(tmp_path / "resumed"))
    assert s["status"] == "interrupted" and s["steps"] == 3 and int(s) == 130  # the step after the signal
    assert signal.getsignal(signal.SIGTERM) is not None and _state(tmp_path / "resumed")["step"] == 3
    monkeypatch.setattr(classify, "evaluate", evaluate)
    assert classify.run_classify(cfg, out=str(tmp_path / "resumed"))["status"] == "complete"
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_resume_refuses_other_settings_and_no_resume_restarts(tmp_path):
    cfg = dict(TINY, method="svdp", rank=2, steps=2, out=str(tmp_path))
    classify.run_classify(cfg)
    with pytest.raises(ValueError, match="rank"):
        classify.run_classify(cfg, rank=3)
    s = classify.run_classify(cfg, rank=3, resume=False)
    assert s["status"] == "complete" and s["rank"] == 3
    # a finished run asked again returns its summary without training
    again = classify.run_classify(dict(cfg, rank=3))
    assert again["accuracy"] == s["accuracy"] and again["wall_time_s"] == s["wall_time_s"]


# ------------------------------------------------------------------------------------------------------ config
def _parser():
    p = argparse.ArgumentParser()
    classify.add_classify_arguments(p)
    return p


def test_config_file_and_flag_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("method: svdp\nrank: 2\nepochs: 3\ndataset: digits8x8\nweight-decay: 1.0e-4\nexclude: []\n")
    args = _parser().parse_args(["--config", str(cfg_file), "--rank", "3", "--steps", "2", "--lr", "0.01"])
    cfg = classify.resolve_config(args)
    assert (cfg["method"], cfg["rank"], cfg["steps"], cfg["epochs"]) == ("svdp", 3, 2, None)
    assert cfg["lr"] == 0.01 and cfg["weight_decay"] == 1e-4 and cfg["exclude"] == []
    assert cfg["optimizer"] == classify.DEFAULTS["optimizer"]  # neither file nor flag: the default

    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"method": "sttp", "steps": 5}))
    cfg = classify.resolve_config(_parser().parse_args(["--config", str(json_file), "--epochs", "1"]))
    assert (cfg["method"], cfg["steps"], cfg["epochs"]) == ("sttp", None, 1.0)

    bad = tmp_path / "bad.yaml"
    bad.write_text("methd: sttp\n")
    with pytest.raises(ValueError, match="methd"):
        classify.resolve_config(config=str(bad))


def test_cli_train_classify_with_config(tmp_path, capsys):
    from torch_sttp import cli

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("dataset: digits8x8\nmodel: small-cnn\nwidth: 4\nmethod: sttp\nrank: 2\nsteps: 50\n"
                        "threads: 1\nprogress: false\n")
    out = tmp_path / "out"
    code = cli.main(["train", "classify", "--config", str(cfg_file), "--steps", "2", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "sttp" and summary["config"]["width"] == 4


def test_missing_cifar_data_gives_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetFilesNotFoundError) as info:
        classify.run_classify(dataset="cifar10", model="wrn", depth=10, widen=1, data_root=str(missing), steps=1,
                              out=str(tmp_path / "run"), progress=False)
    msg = str(info.value)
    assert "--data-root" in msg and "cifar-10-batches-bin" in msg and str(missing) in msg
    assert isinstance(info.value, FileNotFoundError)
    assert classify.main(["--dataset", "cifar10", "--model", "wrn", "--data-root", str(missing),
                          "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "--data-root" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- sweep
def test_sweep_csv_plot_and_resume(tmp_path, monkeypatch):
    base = dict(TINY, steps=2)
    rows = sweep.run_sweep(base, methods=("svdp", "sttp"), ranks=(1, 2), seeds=(0, 1, 2), out=tmp_path,
                           progress=False)
    assert len(rows) == 3 * (1 + 2 * 2)
    with open(tmp_path / "results.csv", newline="") as f:
        assert next(csv.reader(f)) == list(sweep.CSV_COLUMNS)
    assert (tmp_path / "accuracy_vs_z.png").stat().st_size > 0
    agg = {(a["method"], a["rank"]): a for a in sweep.aggregate(rows)}
    assert agg[("dense", None)]["n"] == 3 and agg[("dense", None)]["z"] == 100.0
    assert agg[("sttp", 1)]["z"] < agg[("svdp", 1)]["z"] < 100.0
    assert "| sttp | 2 |" in sweep.format_table(rows)

    # resuming runs nothing that is already in the CSV
    def boom(*a, **k):
        raise AssertionError("re-ran a finished run")

    monkeypatch.setattr(classify, "run_classify", boom)
    assert len(sweep.run_sweep(base, ("svdp", "sttp"), (1, 2), (0, 1, 2), tmp_path, progress=False)) == len(rows)
    with pytest.raises(ValueError, match="other base settings"):
        sweep.run_sweep(dict(base, lr=0.5), ("svdp",), (1,), (0,), tmp_path, progress=False)


def test_sweep_leaves_out_ranks_beyond_full_rank():
    runs, notes = sweep.plan_runs(classify.resolve_config(TINY), ("svdp",), (32, 64, 128), (0,), dense=False)
    assert [r["rank"] for r in runs] == [32]  # width 4: every layer is at full rank from r = 32 on
    assert len(notes) == 2 and "r=64" in notes[0]


def test_compare_at_equal_z_interpolates_the_reference_in_log_z():
    rows = [dict(method="svdp", rank=1, seed=0, z=1.0, accuracy=0.2, wall_time_s=1.0),
            dict(method="svdp", rank=4, seed=0, z=100.0, accuracy=0.8, wall_time_s=1.0),
            dict(method="sttp", rank=2, seed=0, z=10.0, accuracy=0.7, wall_time_s=1.0),
            dict(method="sttp", rank=1, seed=0, z=0.5, accuracy=0.1, wall_time_s=1.0)]
    cmp = {c["rank"]: c for c in sweep.compare_at_equal_z(rows)}
    assert cmp[2]["ref_mean"] == pytest.approx(0.5) and cmp[2]["gap"] == pytest.approx(0.2)
    assert cmp[2]["ref_ranks"] == (1, 4) and cmp[1]["ref_mean"] is None
    assert "+20.0" in sweep.format_comparison(rows)
