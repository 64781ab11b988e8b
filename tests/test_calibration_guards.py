"""Bad calibration data and statistics are refused with errors that name the layer, nothing a layer keeps fixed
(an Embedding's padding row) is changed by a data-aware conversion, and the reported whitened errors describe the
converted layers, whatever their spectrum."""
import copy
import math

import pytest
import torch
from torch import nn

from torch_sttp import convert, load_converted, select_ranks
from torch_sttp.calibration import Calibration, calibrate, load_calibration
from torch_sttp.data_aware import project_whitened
from torch_sttp.layers import weight_matrix
from torch_sttp.whitening import DAMPING

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6)).double()


def _batches(n=3, rows=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 8, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_are_refused_naming_the_layer_and_batch(bad):
    model, batches = _mlp(), _batches()
    batches[1][2, 3] = bad
    with pytest.raises(ValueError, match=r"layer '0' got NaN or Inf inputs in batch 1 \(counting from 0\)"):
        calibrate(model, batches)


def test_a_damaged_statistic_is_refused_on_construction_and_on_load(tmp_path):
    stats = calibrate(_mlp(), _batches())
    good = stats.total("0")
    packed = good[torch.ones_like(good, dtype=torch.bool).triu()]
    layers = {"0": ("0", "linear")}
    with pytest.raises(ValueError, match=r"layer '0'.*NaN or Inf"):
        Calibration(layers, {"0": packed.clone().index_fill_(0, torch.tensor([5]), math.nan)}, {"0": 120},
                    packed=True)
    with pytest.raises(ValueError, match=r"layer '0'.*negative sample count"):
        Calibration(layers, {"0": packed}, {"0": -3}, packed=True)
    with pytest.raises(ValueError, match=r"layer '0'.*not a packed symmetric matrix"):
        Calibration(layers, {"0": packed[:-1]}, {"0": 120}, packed=True)
    from safetensors import safe_open
    from safetensors.torch import save_file

    good_path, path = tmp_path / "good.safetensors", tmp_path / "stats.safetensors"
    stats.save(good_path)
    with safe_open(str(good_path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = stats.key("0")
    tensors[key] = tensors[key].index_fill(0, torch.tensor([0]), math.nan)  # as another tool could write it
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"stats\.safetensors: calibration: layer '0'.*NaN or Inf"):
        load_calibration(path)


def test_full_matrix_statistics_still_load(tmp_path):
    """Files of the first format version hold full d × d sums; they are packed on load, as before."""
    from safetensors.torch import save_file

    from torch_sttp.calibration import META_KEY, unpack_symmetric

    stats = calibrate(_mlp(), _batches())
    stats.save(tmp_path / "packed.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "packed.safetensors"), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: unpack_symmetric(t) if k in (stats.key("0"), stats.key("2")) else t for k, t in tensors.items()}
    save_file(tensors, str(tmp_path / "full.safetensors"), metadata=metadata)
    assert META_KEY in metadata
    loaded = load_calibration(tmp_path / "full.safetensors")
    for name in ("0", "2"):
        assert torch.equal(loaded.moment(name), stats.moment(name))


def test_total_of_an_embedding_is_a_fresh_tensor():
    emb = nn.Embedding(10, 4)
    stats = calibrate(emb, [torch.tensor([[1, 2, 2, 3]])])
    before = stats.moment("").clone()
    stats.total("").zero_()
    assert torch.equal(stats.moment(""), before)


def test_a_sequence_first_input_with_an_attention_mask_is_refused():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(20, 8), nn.Linear(8, 4)

        def forward(self, input_ids, attention_mask):
            return self.lin(self.emb(input_ids).transpose(0, 1))  # (T, B, d)

    ids = torch.randint(0, 20, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    calibrate(SequenceFirst(), [{"input_ids": ids, "attention_mask": mask}])  # nothing masked: nothing to refuse
    mask[0, 3:] = 0
    with pytest.raises(ValueError, match=r"layer 'lin': its tensor is sequence-first \(5, 3, 8\)"):
        calibrate(SequenceFirst(), [{"input_ids": ids, "attention_mask": mask}])


def test_an_attention_mask_leaves_per_sequence_inputs_alone():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.cls, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask):
            h = self.emb(input_ids)
            return self.head(self.cls(h[:, :1]).mean(1))  # (B, 1, d), then (B, d)

    ids = torch.randint(0, 20, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    stats = calibrate(Pooled(), [{"input_ids": ids, "attention_mask": mask}])
    assert stats.samples("emb") == 13 and stats.samples("cls") == 3 and stats.samples("head") == 3


@pytest.mark.parametrize("method", ["svdp", "sttp"])
@pytest.mark.parametrize("row", ["pretrained", "zero"])
def test_a_data_aware_conversion_keeps_the_padding_row(method, row):
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8, padding_idx=0)  # its padding row starts at zero
    if row == "pretrained":
        with torch.no_grad():
            emb.weight[0] = torch.randn(8)
    kept = emb.weight.detach()[0].clone()
    ids = torch.randint(0, 20, (4, 7))
    stats = calibrate(emb, [ids])
    one_shot, sequential = copy.deepcopy(emb), copy.deepcopy(emb)
    convert(one_shot, method, 2, "free", init="pretrained", calibration=stats)
    assert torch.equal(one_shot.weight.detach()[0], kept)
    project_whitened(sequential, method, 2, batches=[ids], sequential=True)
    assert torch.equal(sequential.weight.detach()[0], kept)
    rows = torch.arange(1, 20)
    assert torch.allclose(sequential.weight.detach()[rows], one_shot.weight.detach()[rows], atol=1e-5)


def _hand_whitened_error(dense_weight, converted, stats, name):
    c = stats.moment(name)
    c.diagonal().add_(DAMPING * float(c.diagonal().mean()))
    e = (dense_weight - converted).double()
    return math.sqrt(float(torch.trace(e @ c @ e.mT)) / float(torch.trace(dense_weight.double() @ c @ dense_weight.double().mT)))


@pytest.mark.filterwarnings("ignore:loading a dense weight")
@pytest.mark.parametrize("spectrum", ["identity", "normalized", "free"])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_whitened_errors_are_those_of_the_converted_layers(method, spectrum):
    dense, batches = _mlp(), _batches()
    stats = calibrate(dense, batches)
    model = copy.deepcopy(dense)
    result = project_whitened(model, method, 3, stats, spectrum=spectrum)
    for name in ("0", "2"):
        want = _hand_whitened_error(weight_matrix(dense.get_submodule(name)).detach(),
                                    weight_matrix(model.get_submodule(name)).detach(), stats, name)
        assert result.whitened_errors[name] == pytest.approx(want, rel=1e-9)


@pytest.mark.filterwarnings("ignore:loading a dense weight")
@pytest.mark.parametrize("method", ["svdp", "sttp"])
@pytest.mark.parametrize("spectrum", ["identity", "normalized"])
def test_sequential_runs_fit_and_score_later_layers_on_the_converted_model(method, spectrum):
    dense, batches = _mlp(), _batches()
    model = copy.deepcopy(dense)
    result = project_whitened(model, method, 3, batches=batches, sequential=True, spectrum=spectrum)
    free = project_whitened(copy.deepcopy(dense), method, 3, batches=batches, sequential=True)
    # layer '2' sees the outputs of layer '0' as converted: its metric is built from them by hand
    with torch.no_grad():
        inputs = [torch.relu(model[0](x)) for x in batches]
    stats = {"0": calibrate(dense, batches, layers=["0"]), "2": calibrate(nn.Linear(12, 6).double(), inputs)}
    for name, key in (("0", "0"), ("2", "")):
        want = _hand_whitened_error(weight_matrix(dense.get_submodule(name)).detach(),
                                    weight_matrix(model.get_submodule(name)).detach(), stats[name], key)
        assert result.whitened_errors[name] == pytest.approx(want, rel=1e-7)
    assert result.whitened_errors["0"] > free.whitened_errors["0"]  # the spectrum's constraint costs


def test_meta_models_are_refused_with_the_fix():
    stats = calibrate(_mlp(), _batches())
    with torch.device("meta"):
        meta = _mlp()
    with pytest.raises(ValueError, match=r"layer '0' got an input on the meta device"):
        calibrate(meta, [torch.randn(4, 8, dtype=torch.float64, device="meta")])
    with pytest.raises(ValueError, match=r"layer '0'.*meta device"):
        convert(copy.deepcopy(meta), "svdp", 3, "free", init="pretrained", calibration=stats)
    with pytest.raises(ValueError, match=r"layer '0'.*meta device"):
        select_ranks(meta, 0.5, "svdp", calibration=stats)


def test_output_scales_are_checked_before_any_work():
    dense = _mlp()
    model = copy.deepcopy(dense)

    def batches():  # any calibration pass before the refusal would fail the test
        raise AssertionError("the batches were read")
        yield

    for sequential in (True, False):
        with pytest.raises(ValueError, match=r"layer '2': output_scale needs 6 finite values"):
            project_whitened(model, "svdp", 3, batches=batches(), sequential=sequential,
                             output_scales={"2": torch.ones(5)})
        with pytest.raises(ValueError, match=r"layer '2': method 'sttp' does not take an output_scale"):
            project_whitened(model, "sttp", 3, batches=batches(), sequential=sequential,
                             output_scales={"2": torch.ones(6)})
    for a, b in zip(model.state_dict().values(), dense.state_dict().values()):
        assert torch.equal(a, b)


def test_output_scales_of_layers_not_projected_are_ignored():
    dense, data = _mlp(), _batches()
    scales = {"0": torch.rand(12, dtype=torch.float64) + 0.5, "2": torch.rand(6, dtype=torch.float64) + 0.5}
    only_first, reference = copy.deepcopy(dense), copy.deepcopy(dense)
    project_whitened(only_first, "svdp", 3, batches=data, include=["0"], output_scales=scales)
    project_whitened(reference, "svdp", 3, batches=data, include=["0"], output_scales={"0": scales["0"]})
    assert torch.equal(only_first[0].weight, reference[0].weight)


def test_load_converted_points_to_the_state_dict_inside_a_cli_checkpoint():
    model = _mlp()
    convert(model, "svdp", 3)
    checkpoint = {"state_dict": model.state_dict(), "torch_sttp": {"method": "svdp"}}
    with pytest.raises(ValueError, match=r"torch\.load\(path\)\['state_dict'\]"):
        load_converted(_mlp(), checkpoint)


def test_reestimate_batchnorm_refuses_non_finite_inputs_and_keeps_every_statistic():
    from torch_sttp.calibration import reestimate_batchnorm

    class Log(nn.Module):  # -inf wherever its input is not positive
        def forward(self, x):
            return torch.log(x.relu())

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), Log(), nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))
    model.eval()
    batches = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer '4' got NaN or Inf inputs"):
        reestimate_batchnorm(model, batches)  # batch norm '1' was re-estimated first, then restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layer_sensitivity_refuses_non_finite_inputs():
    from torch_sttp.calibration import layer_sensitivity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6)).double()  # tanh' carries the NaN back
    batches = _batches()
    batches[0][1, 1] = math.nan
    with pytest.raises(ValueError, match=r"layers \['0'\] got NaN or Inf output gradients"):
        layer_sensitivity(model, batches)
