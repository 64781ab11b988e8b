"""The adapter recipe (``sttp train adapt``): exact resume, logs, saved adapters, parameter counts, user errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import torch_sttp
from torch_sttp import cli
from torch_sttp.checkpoint import load_checkpoint
from torch_sttp.experiments import adapt
from torch_sttp.experiments.adapt_tasks import adapter_targets, make_task


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One folder for the pretrained SmallCNN (1 epoch on digits 0-4), shared by the tests."""
    return tmp_path_factory.mktemp("cnn-cache")


def _tiny(cache, **settings):
    return dict(dict(task="vision", max_train=48, max_eval=40, pretrain_epochs=1, cache_dir=str(cache), batch=16,
                     eval_batch=40, threads=1, progress=False), **settings)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert sa["step"] == sb["step"] and sa["model"].keys() == sb["model"].keys()
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), (i, k)
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(_csv(a / "metrics.csv")) == strip(_csv(b / "metrics.csv"))
    ja, jb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    for k in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_loss", "steps"):
        assert ja[k] == jb[k], k
    assert (a / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (b / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("settings", [dict(kind="rotation", rank=4, lr=3e-3),
                                      dict(kind="delta", method="sttp", rank=3, schedule="linear", warmup=2),
                                      dict(kind="principal", method="svdp", rank=2, weight_decay=1e-2)])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, cache, settings):
    cfg = _tiny(cache, steps=6, eval_every=2, checkpoint_every=100, **settings)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    s = adapt.run_adapt(cfg, out=str(straight))
    assert s["status"] == "complete" and s["steps"] == 6 and int(s) == 0
    first = adapt.run_adapt(cfg, out=str(resumed), stop_at=3)
    assert first["status"] == "interrupted" and first["steps"] == 3 and first["adapter_dir"] is None
    assert not (resumed / "summary.json").exists() and not (resumed / "adapter").exists()
    assert load_checkpoint(resumed / "checkpoint.pt")["step"] == 3
    second = adapt.run_adapt(cfg, out=str(resumed))
    assert second["status"] == "complete" and second.trained_steps == 3
    _assert_same_run(straight, resumed)


def test_run_logs_counts_and_saves_adapters_that_load_back(tmp_path, cache):
    s = adapt.run_adapt(_tiny(cache, kind="rotation", rank=4, steps=3, eval_every=2, out=str(tmp_path)))
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert next(csv.reader(f)) == list(adapt.METRIC_COLUMNS)
    rows = _csv(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [2, 3] and float(rows[-1]["val_acc"]) == s["val_accuracy"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(adapt.SUMMARY_KEYS) <= set(saved) and saved["test_accuracy"] == s["test_accuracy"]
    # a fresh adapted model with the saved adapters loaded gives the trained model's outputs bit for bit
    task = make_task("vision", cache, 1, 48, 40)
    trained = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    reference = task.make_model(0)
    torch_sttp.add_adapters(reference, "rotation", rank=4, trainable="head", **adapter_targets("vision"))
    reference.load_state_dict(trained)
    counts = torch_sttp.adapters.parameter_counts(reference)
    assert (s["trainable_params"], s["total_params"]) == (counts.trainable, counts.total)
    # 4 reflectors of length d_in on conv1-3 and fc (9, 16·9, 32·9, 256), and the new head (10 → 5)
    assert s["trainable_params"] == s["adapter_params"] == 4 * (9 + 144 + 288 + 256) + 55 < s["total_params"]
    model = torch_sttp.load_adapters(task.make_model(0), tmp_path / "adapter")
    stats = {k: v for k, v in trained.items() if "running_" in k or "num_batches" in k}
    assert len(stats) == 9  # the BatchNorm statistics move in training mode: base-model state, not adapter state
    assert not model.load_state_dict(stats, strict=False).unexpected_keys
    x = task.data["test"][0]["x"][:8]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))
    again = adapt.run_adapt(_tiny(cache, kind="rotation", rank=4, steps=3, eval_every=2, out=str(tmp_path)))
    assert again.trained_steps == 0 and again["test_accuracy"] == s["test_accuracy"]


def test_resume_refuses_other_settings(tmp_path, cache):
    cfg = _tiny(cache, kind="delta", rank=2, steps=2, out=str(tmp_path))
    adapt.run_adapt(cfg)
    with pytest.raises(ValueError, match="rank: 2 → 3"):
        adapt.run_adapt(cfg, rank=3)
    assert adapt.run_adapt(cfg, rank=3, resume=False)["rank"] == 3


@pytest.mark.parametrize("flags, message", [
    (["--kind", "rotation", "--rank", "3"], "a rotation adapter needs an even rank"),
    (["--kind", "delta", "--two-sided"], "two_sided applies to rotation adapters only"),
    (["--kind", "rotation", "--method", "sttp"], "method 'sttp' does not apply to rotation adapters"),
    (["--lr", "0"], "lr must be a number > 0"),
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["--steps", "0"], "steps must be an integer ≥ 1"),
])
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "adapt", "--out", str(tmp_path / "run"), *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sttp: error: ") and message in lines[0], captured.err
    assert captured.out == "" and not (tmp_path / "run").exists()


def test_config_file_and_flags_layer(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"task": "vision", "kind": "delta", "rank": 5, "epochs": 2}))
    cfg = adapt.resolve_config({"config": str(path), "steps": 7})
    assert (cfg["kind"], cfg["rank"], cfg["steps"], cfg["epochs"]) == ("delta", 5, 7, None)
    with pytest.raises(ValueError, match="unknown settings \\['rnak'\\]"):
        adapt.resolve_config({"rnak": 3})
