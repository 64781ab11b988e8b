"""Tests for torch_sttp.report (per-layer report, Z of eq. 11, arithmetic route) and the paper's published Z."""
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from torch_sttp.modules import layer_state
from torch_sttp.experiments.models import build_model, state_dict_numel
from torch_sttp.experiments.paper import PAPER_SETTINGS, reproduce_compression
from torch_sttp.report import CompressionReport, compression, count_model_dof, report
from torch_sttp.surgery import convert, converted_layers, spectral_parametrization
from torch_sttp.tt import count_dof

METHODS = ("svdp", "sttp")
SPECTRA = ("identity", "normalized", "free")


class Mixed(nn.Module):
    """Linear, Conv, ConvTranspose and Embedding layers, plus BatchNorm and a bias-free layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10, bias=False)

    def forward(self, idx):  # idx: (B, 4, 4) token ids
        h = self.emb(idx).permute(0, 3, 1, 2)
        h = torch.relu(self.bn(self.conv(h)))
        return self.fc(self.up(h).flatten(1))


def _input(batch=2):
    return torch.randint(0, 12, (batch, 4, 4), generator=torch.Generator().manual_seed(0))


def _same_rows(a: CompressionReport, b: CompressionReport):
    fields = ("name", "type", "method", "spectrum", "weight_shape", "matrix_shape", "out_modes", "in_modes",
              "tt_ranks", "rank", "dof", "numel")
    assert [tuple(getattr(r, f) for f in fields) for r in a.layers] == \
           [tuple(getattr(r, f) for f in fields) for r in b.layers]
    assert (a.dof_total, a.numel_total, a.other) == (b.dof_total, b.numel_total, b.other)
    assert a.z == b.z


# ---------------------------------------------------------------------------------------------- per-layer rows
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("method", METHODS)
def test_rows_match_parametrization(method, spectrum):
    model = convert(Mixed(), method, rank=5, spectrum=spectrum)
    rep = report(model, print_table=False)
    layers = dict(converted_layers(model))
    assert [r.name for r in rep.layers] == ["emb", "conv", "up", "fc"]
    assert [r.type for r in rep.layers] == ["Embedding", "Conv2d", "ConvTranspose2d", "Linear"]
    for row in rep.layers:
        p = spectral_parametrization(layers[row.name])
        assert row.dof == p.dof == count_dof(p.layout_shape, method, 5, spectrum)
        assert row.numel == math.prod(p.weight_shape) == layers[row.name].weight.numel()
        assert row.weight_shape == tuple(layers[row.name].weight.shape)
        assert row.matrix_shape == (p.d_out, p.d_in)
        assert row.tt_ranks == tuple(p.ranks)
        assert row.rank == p.r_mid == min(5, p.d_out, p.d_in)
        assert row.modes == "x".join(map(str, p.out_modes)) + "|" + "x".join(map(str, p.in_modes))
        assert row.ratio == row.dof / row.numel
        assert row.path is None and row.flops_per_sample is None
    up = next(r for r in rep.layers if r.name == "up")
    assert up.weight_shape == (8, 4, 3, 3) and up.matrix_shape == (4, 72)  # transposed conv: (C_out, C_in·k)
    if method == "sttp":
        assert up.modes == "2x2|2x2x2x9"
    else:
        assert up.modes == "4|72"
    assert rep.dof_total == sum(r.dof for r in rep.layers)
    assert rep.numel_total == sum(r.numel for r in rep.layers)


# ---------------------------------------------------------------------------------------------- Z by hand
class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 8)            # converted: 96 weights; bias 8 goes to C
        self.bn = nn.BatchNorm1d(8)          # weight, bias, running mean, running var: 32 in C
        self.b = nn.Linear(8, 4, bias=False)  # left dense: 32 in C

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


@pytest.mark.parametrize("method, dof", [
    # STTP, modes 2·2·2 | 2·2·3, bond ranks 1,2,3,3,3,3,1 (cap 3):
    # Σ R n R = 4 + 12 + 18 + 18 + 18 + 9 = 79, minus inner R² = 4 + 4·9 = 40, minus r(r+1)/2 = 6 → 33
    ("sttp", 33),
    # SVDP: r(d_out + d_in) − r(3r+1)/2 = 3·20 − 15 = 45
    ("svdp", 45),
])
def test_z_by_hand(method, dof):
    model = convert(TwoLinear(), method, rank=3, spectrum="identity", include="a")
    rep = report(model, print_table=False)
    c = 8 + 4 * 8 + 4 * 8
    assert rep.other == c
    assert rep.dof_total == dof and rep.numel_total == 96
    assert rep.z == pytest.approx(100 * (dof + c) / (96 + c), rel=1e-12)
    assert compression(model) == rep.z
    assert float(rep) == rep.z
    if method == "sttp":
        assert rep.z == pytest.approx(62.5)
    # num_batches_tracked and the parametrization tensors are not in C
    assert "bn.num_batches_tracked" in model.state_dict()
    assert any(".parametrizations.weight.original" in k for k in model.state_dict())


def test_learned_spectrum_adds_r():
    z = {}
    for spectrum in SPECTRA:
        rep = report(convert(TwoLinear(), "svdp", rank=3, spectrum=spectrum, include="a"), print_table=False)
        z[spectrum] = rep.dof_total
    assert z["normalized"] == z["free"] == 3 * 20 - 9
    assert z["identity"] == 45


def test_unconverted_model_is_100_percent():
    model = TwoLinear()
    rep = report(model, print_table=False)
    assert rep.layers == [] and rep.z == 100.0
    assert rep.other == state_dict_numel(model)
    assert "no reparameterized layers" in str(rep)


# ---------------------------------------------------------------------------------------------- skipped layers
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.dec(self.enc(x)))


def test_skipped_layers_listed():
    dense_rep = count_model_dof(Tied(), "sttp", 4, "normalized")
    model = convert(Tied(), "sttp", rank=4)
    rep = report(model, print_table=False)
    assert [r.name for r in rep.layers] == ["head"]
    assert [(s.name, s.type) for s in rep.skipped] == [("enc", "Linear"), ("dec", "Linear")]
    assert all("tied" in s.reason for s in rep.skipped)
    # the tied weight is counted once: 36 + two biases of 6 + the head's bias 2
    assert rep.other == 36 + 6 + 6 + 2
    text = str(rep)
    assert "skipped" in text and "enc" in text and "dec" in text and "tied" in text
    _same_rows(dense_rep, rep)
    assert [(s.name, s.type, s.reason) for s in dense_rep.skipped] == [(s.name, s.type, s.reason) for s in rep.skipped]


# ---------------------------------------------------------------------------------------------- two routes agree
SMALL_GANS = [
    ("sngan32-d", dict(ndf=16), None),
    ("sngan48-d", dict(ndf=64), None),          # widths 4, 8, 16, 32, 64
    ("sngan32-g", dict(ngf=16), "noise_to_conv"),
]


@pytest.mark.parametrize("spectrum", ("identity", "normalized"))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name, kwargs, exclude", SMALL_GANS, ids=[g[0] for g in SMALL_GANS])
def test_arithmetic_route_equals_conversion(name, kwargs, exclude, method, spectrum):
    torch.manual_seed(0)
    dense = build_model(name, **kwargs)
    arithmetic = count_model_dof(dense, method, 16, spectrum, exclude=exclude)
    assert arithmetic.source == "arithmetic"
    assert state_dict_numel(dense) == arithmetic.numel_total + arithmetic.other
    model = convert(dense, method, rank=16, spectrum=spectrum, exclude=exclude)
    converted = report(model, print_table=False)
    _same_rows(arithmetic, converted)
    assert len(converted.layers) == len(converted_layers(model))
    if exclude:
        assert exclude not in [r.name for r in converted.layers]
        assert converted.other > model.noise_to_conv.weight.numel()


def test_arithmetic_route_with_transposed_conv_embedding_and_rank_map():
    for method in METHODS:
        _same_rows(count_model_dof(Mixed(), method, 5, "identity"),
                   report(convert(Mixed(), method, rank=5, spectrum="identity"), print_table=False))
    ranks = {"conv": 3, "up": 2}
    _same_rows(count_model_dof(Mixed(), "sttp", ranks, "free"),
               report(convert(Mixed(), "sttp", rank=ranks, spectrum="free"), print_table=False))
    _same_rows(count_model_dof(Mixed(), "sttp", 4, "free", include=[nn.Conv2d, "fc"], exclude="conv"),
               report(convert(Mixed(), "sttp", rank=4, spectrum="free", include=[nn.Conv2d, "fc"],
                              exclude="conv"), print_table=False))


def test_arithmetic_route_errors():
    with pytest.raises(ValueError, match="matches no module"):
        count_model_dof(Mixed(), "sttp", 4, "free", exclude="nope")
    with pytest.raises(ValueError, match="rank"):
        count_model_dof(Mixed(), "sttp", 0, "free")
    with pytest.raises(ValueError, match="method"):
        count_model_dof(Mixed(), "tucker", 4, "free")
    with pytest.raises(ValueError, match="already converted"):
        count_model_dof(convert(Mixed(), "svdp", rank=2), "svdp", 2, "free")


def test_arithmetic_route_on_meta_wrn():
    with torch.device("meta"):
        model = build_model("wrn28-10")
    rep = count_model_dof(model, "sttp", 64, "normalized")
    assert rep.numel_total + rep.other == 36_507_242
    assert len(rep.layers) == 1 + 3 * 4 * 2 + 3 + 1  # conv_in, 24 block convs, 3 shortcuts, fc
    assert 0 < rep.z < 100


# ---------------------------------------------------------------------------------------------- forward info
@pytest.mark.parametrize("path", ["dense", "lowrank"])
def test_flops_per_sample_are_flops_for_every_layer_type(path):
    # the per-call overhead that steers "auto" is not work: it stays out of the recorded FLOPs (a Linear had 1e6
    # per call in them, convolutions none); batch 2, rank 4
    linear = report(convert(nn.Sequential(nn.Linear(24, 8)), "svdp", rank=4, spectrum="free", path=path),
                    example_input=torch.randn(2, 24)).layers[0]
    expected = {"dense": 2 * 8 * 24 * 2 + 2 * 4 * 8 * 24,   # the product, and forming W = (U·Σ)·Vᵀ
                "lowrank": 2 * 4 * (24 + 8) * 2 + 4 * 2}   # x·V, ·σ, ·Uᵀ
    assert linear.flops_per_sample == pytest.approx(expected[path] / 2)
    conv = report(convert(nn.Sequential(nn.Conv1d(8, 6, 3, bias=False)), "svdp", rank=4, spectrum="free",
                          path=path), example_input=torch.randn(2, 8, 24)).layers[0]
    expected = {"dense": 2 * 6 * 24 * 22 * 2 + 2 * 4 * 6 * 24,  # d_in = 8·3, 22 output positions
                "lowrank": 2 * 4 * (24 * 22 + 6 * 22) * 2}
    assert conv.flops_per_sample == pytest.approx(expected[path] / 2)


def test_example_input_records_paths_and_restores_modes():
    model = convert(Mixed(), "sttp", rank=5)
    model.train()
    model.bn.eval()  # a mixed state must come back as it was
    rep = report(model, example_input=_input(), print_table=False)
    assert model.training and model.conv.training and not model.bn.training
    for row in rep.layers:
        assert row.path in ("dense", "lowrank", "tt")
        assert row.flops_per_sample is not None and row.flops_per_sample >= 0
        layer = dict(converted_layers(model))[row.name]
        assert row.path == layer_state(layer).last_path
        assert row.flops_per_sample == layer_state(layer).last_flops_per_sample
    assert rep.flops_per_sample == pytest.approx(sum(r.flops_per_sample for r in rep.layers))
    assert "FLOPs/sample" in rep.summary()
    # keyword inputs are passed through
    rep2 = report(model, example_input={"idx": _input(3)}, print_table=False)
    assert all(r.path is not None for r in rep2.layers)


def test_report_returns_and_prints_only_when_asked(capsys):
    model = convert(build_model("sngan32-d", ndf=16), "sttp", rank=8, spectrum="identity")
    rep = report(model)
    assert capsys.readouterr().out == ""                    # a library function returns; it does not print
    print(report(model))                                    # the README's line: the table once
    out = capsys.readouterr().out
    assert out == str(rep) + "\n" and out.count("Z = ") == 1
    assert sum(line.split()[:2] == ["layer", "type"] for line in out.splitlines()) == 1
    compression(model)
    count_model_dof(build_model("sngan32-d", ndf=16), "sttp", 8)
    assert capsys.readouterr().out == ""
    report(model, print_table=True)
    assert capsys.readouterr().out == str(rep) + "\n"


def test_printed_table_lists_every_layer(capsys):
    model = convert(build_model("sngan32-d", ndf=16), "sttp", rank=8, spectrum="identity")
    rep = report(model, print_table=True)
    out = capsys.readouterr().out
    assert out.strip() == str(rep).strip()
    names = [n for n, _ in converted_layers(model)]
    assert len(names) == len(rep.layers) > 5
    lines = out.splitlines()
    for name in names:
        assert any(line.split()[0] == name for line in lines if line.strip())
    assert f"Z = {rep.z:.4g}%" in lines[-1]
    # aligned: the rule under the header marks the columns; every row has blanks exactly between them
    header, rule = lines[0], lines[1]
    assert set(rule.replace(" ", "")) == {"-"}
    gaps = [i for i, ch in enumerate(rule) if ch == " "]
    for line in lines[:2 + len(names)]:
        assert all(i >= len(line) or line[i] == " " for i in gaps), line
    assert header.split()[:3] == ["layer", "type", "method"]


def test_to_dict_is_json():
    model = convert(Mixed(), "svdp", rank=5, spectrum="normalized")
    rep = report(model, example_input=_input(), print_table=False)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["z"] == pytest.approx(rep.z)
    assert d["dof_total"] == rep.dof_total and d["numel_total"] == rep.numel_total and d["other"] == rep.other
    assert [layer["name"] for layer in d["layers"]] == ["emb", "conv", "up", "fc"]
    row = d["layers"][2]
    assert row["weight_shape"] == [8, 4, 3, 3] and row["modes"] == "4|72" and row["rank"] == 4
    assert row["ratio"] == pytest.approx(row["dof"] / row["numel"])
    assert d["skipped"] == []


def test_core_does_not_import_experiments():
    code = "import sys, torch_sttp.report; print(any(m.startswith('torch_sttp.experiments') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- the paper
def test_paper_table_is_complete():
    assert len(PAPER_SETTINGS) == 20
    printed = sorted(s.published for s in PAPER_SETTINGS)
    assert printed == sorted(["93.1", "87.7", "89.4", "74.1", "51.7", "16.7", "53.3", "18.3", "14.2", "3.24",
                              "14.5", "3.51", "27.71", "6.44", "53.36", "18.33", "25.14", "14.61", "37.13",
                              "18.82"])
    by_value = {s.published: s for s in PAPER_SETTINGS}
    assert by_value["3.24"].tolerance == pytest.approx(0.01)
    assert by_value["93.1"].tolerance == pytest.approx(0.1)
    assert by_value["14.61"].exclude == ("noise_to_conv",)
    assert by_value["14.61"].model == "sngan32-g"


def test_reproduce_every_published_value():
    rows = reproduce_compression()
    assert len(rows) == len(PAPER_SETTINGS)
    bad = [(r.setting, r.method, r.printed, round(r.ours, 4)) for r in rows if not r.within_tolerance]
    assert not bad, f"published Z not reproduced: {bad}"
    for r in rows:
        assert abs(r.ours - r.published) <= r.tolerance * (1 + 1e-9)


def test_paper_setting_matches_real_conversion():
    """The arithmetic behind a published value equals the report of the actually converted (reduced) model."""
    setting = next(s for s in PAPER_SETTINGS if s.model == "sngan32-d-reduced" and s.method == "sttp")
    model = build_model(setting.model)
    convert(model, setting.method, rank=setting.rank, spectrum=setting.spectrum)
    ours = reproduce_compression([setting])[0].ours
    assert compression(model) == pytest.approx(ours, rel=1e-12)


# ---------------------------------------------------------------------------------------------------- adapters
def test_report_counts_trainable_and_total_parameters_of_an_adapted_model():
    """The counts from the shapes alone: U and V reflector blocks plus the spectrum of the delta adapter on a
    (10, 12) Linear, 2 reflectors of length 12 for the rotation on another name, and the trainable copy of the
    last layer (40 + 4); the base model's 174 entries stay frozen."""
    from torch_sttp import add_adapters
    from torch_sttp.parametrizations import SpectralParametrization

    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    base = sum(p.numel() for p in model.parameters())
    assert base == 174
    plain = report(model)
    assert (plain.trainable_params, plain.total_params, plain.adapters) == (174, 174, [])
    add_adapters(model, "delta", "svdp", rank=3, target=["0"], trainable=["2"])
    add_adapters(model, "rotation", rank=2, target=["0"], name="rot")
    p = SpectralParametrization((10, 12), 3, "svdp", "free")
    delta = p.u_side.numel + p.v_side.numel + p.r_mid
    rep = report(model)
    assert [(a.name, a.kind, a.method, a.rank, a.layers, a.active) for a in rep.adapters] == \
        [("default", "delta", "svdp", 3, 1, False), ("rot", "rotation", None, 2, 1, True)]
    assert [a.params for a in rep.adapters] == [delta + 44, 2 * 12]
    assert rep.trainable_params == 2 * 12  # only the active adapter trains; its trainable list is empty
    assert rep.total_params == base + delta + 44 + 2 * 12
    assert f"parameters: 24 trainable of {rep.total_params:,}" in rep.summary()
    text = str(rep)
    assert "rot (active): rotation rank 2 on 1 layers, 24 parameters" in text and "no reparameterized" not in text
    saved = json.loads(json.dumps(rep.to_dict()))
    assert (saved["trainable_params"], saved["total_params"]) == (24, rep.total_params)
    assert saved["adapters"][0]["params"] == delta + 44


def test_an_embeddings_fixed_padding_row_counts_in_the_compressed_model_only():
    """Eq. 11: every state-dict value of the converted model over every value of the dense one. The fixed padding
    row is stored by the converted model only: in the numerator, not in the dense denominator."""
    import copy

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Embedding(100, 16, padding_idx=0), nn.Linear(16, 4))
    converted = convert(copy.deepcopy(dense), "svdp", 4, spectrum="free", init="pretrained")
    dense_values = sum(v.numel() for v in dense.state_dict().values())
    row = converted.state_dict()["0.parametrizations.weight.1.row"]
    dof = count_dof((100, 16), "svdp", 4, "free") + count_dof((4, 16), "svdp", 4, "free")
    for rep in (report(converted), count_model_dof(dense, "svdp", 4, "free")):
        assert rep.numel_total + rep.other == dense_values  # the dense model's own count
        assert (rep.dof_total, rep.other, rep.stored) == (dof, 4, row.numel())
        assert rep.z == pytest.approx(100 * (dof + 4 + row.numel()) / dense_values)
