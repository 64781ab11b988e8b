"""Export keeps what the converted model meant beyond its outputs: weights stay parameters (frozen or not, under
no_grad too), flags and training mode carry over, subclass forwards and hooks survive, aliases stay tied."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_sttp

F64 = torch.float64


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).to(F64)
    return torch_sttp.convert(model, "svdp", 3, spectrum="free", init="random")


@pytest.mark.parametrize("export", [torch_sttp.to_dense, torch_sttp.to_factorized])
@pytest.mark.parametrize("no_grad", [False, True])
def test_exported_weights_are_parameters_with_the_layers_flags(export, no_grad):
    model = _model()
    for t in model[0].parameters():
        t.requires_grad_(False)  # a frozen first layer
    model.eval()
    x = torch.randn(3, 6, dtype=F64)
    expected = model(x).detach()
    if no_grad:
        with torch.no_grad():
            export(model)
    else:
        export(model)
    assert not list(model.buffers())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags and all(flag == (not n.startswith("0.")) for n, flag in flags.items()), flags
    assert all(not m.training for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


class Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_to_factorized_keeps_subclass_forwards_and_hooks_by_exporting_them_dense():
    torch.manual_seed(0)
    model = nn.Sequential(Scaled(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)).to(F64)
    torch_sttp.convert(model, "svdp", 2, spectrum="free", init="random")
    calls = []
    model[1].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(4, 6, dtype=F64)
    expected = model(x).detach()
    torch_sttp.to_factorized(model)
    assert type(model[0]) is Scaled and type(model[1]) is nn.Linear and isinstance(model[2], nn.Sequential)
    calls.clear()
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    assert calls == [1]


class Renamed(nn.Linear):
    """A subclass without a forward of its own (as many libraries define their layers)."""


def test_a_subclass_without_a_forward_of_its_own_is_still_factorized():
    torch.manual_seed(0)
    model = torch_sttp.convert(nn.Sequential(Renamed(6, 5), nn.Linear(5, 3)).to(F64), "svdp", 2, spectrum="free",
                               init="random")
    x = torch.randn(4, 6, dtype=F64)
    expected = model(x).detach()
    torch_sttp.to_factorized(model)
    assert isinstance(model[0], nn.Sequential)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 6)
        self.alias = self.layer

    def forward(self, x):
        return self.alias(torch.relu(self.layer(x)))


def test_to_factorized_replaces_a_layer_at_every_name_it_has():
    torch.manual_seed(0)
    model = torch_sttp.convert(Twice().to(F64), "svdp", 3, spectrum="free", init="random")
    x = torch.randn(2, 6, dtype=F64)
    expected = model(x).detach()
    torch_sttp.to_factorized(model)
    assert isinstance(model.layer, nn.Sequential) and model.alias is model.layer
    assert not any(k.startswith(("layer.parametrizations", "alias.parametrizations")) for k in model.state_dict())
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["svdp", "sttp"])
@pytest.mark.parametrize("train", [True, False])
def test_torch_export_of_a_converted_model_matches_it(method, train):
    """torch.export traces a converted model as it is (no export step first): the frames go through plain
    differentiable ops there, as under torch.func."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 12), nn.ReLU(),
                          nn.Linear(12, 5))
    torch_sttp.convert(model, method, 4, init="random").train(train)
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)
