"""Adapters among other adapters and on models they cannot start from: a module trained whole under one adapter is
never replaced by another's layer, adapters live on one root, a failed load leaves the active adapter as it was,
tied trainable modules save and load, meta weights and torch.compile's wrapper are refused with a clear message."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_sttp
from torch_sttp.adapters import active_adapter, adapter_info, add_adapters_to_layers


class MLP(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2, self.head = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.fc2(self.act(self.fc1(x))))


def _perturb(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _snapshot(model: nn.Module, name: str) -> dict:
    return {k: t.detach().clone() for k, t in torch_sttp.adapter_state_dict(model, name).items()}


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))


def test_a_later_adapter_leaves_a_module_trained_whole_under_another_alone():
    model = MLP()
    torch_sttp.add_adapters(model, "delta", rank=2, name="a", trainable=["head"])
    _perturb(model)
    before, out = _snapshot(model, "a"), model(X).detach()
    torch_sttp.add_adapters(model, "delta", rank=2, name="b")  # every Linear by default
    assert sorted(adapter_info(model, "b").layers) == ["fc1", "fc2"]
    assert any(n == "head" and "trained whole under adapter 'a'" in why for n, _, why in adapter_info(model, "b").skipped)
    torch_sttp.set_active_adapter(model, "a")
    after = _snapshot(model, "a")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(X), out)


def test_adding_exactly_a_layer_trained_whole_under_another_adapter_is_refused():
    model = MLP()
    torch_sttp.add_adapters(model, "delta", rank=2, name="a", target=["fc1"], trainable=["head"])
    with pytest.raises(ValueError, match=r"layer 'head' \(Linear\) cannot carry the adapter: trained whole"):
        add_adapters_to_layers(model, ["head"], "delta", rank=2, name="b")
    assert torch_sttp.adapters.adapter_names(model) == ["a"]


def test_a_trainable_module_holding_adapter_layers_is_refused_on_every_path():
    model = MLP()
    torch_sttp.add_adapters(model, "delta", rank=2, name="a", target=["head"])
    with pytest.raises(ValueError, match="trainable module 'head' holds adapter layers"):
        add_adapters_to_layers(model, ["fc1"], "delta", rank=2, name="c", trainable=["head"])
    assert torch_sttp.adapters.adapter_names(model) == ["a"]


def test_adapters_live_on_one_root():
    outer = nn.Sequential(MLP(), nn.Linear(3, 2))
    torch_sttp.add_adapters(outer[0], "delta", rank=2, name="a")
    with pytest.raises(ValueError, match="submodule '0' already has adapters"):
        torch_sttp.add_adapters(outer, "delta", rank=2, name="b")
    torch_sttp.unload_adapters(outer[0])
    torch_sttp.add_adapters(outer, "delta", rank=2, name="b")
    with pytest.raises(ValueError, match="carries adapters of an enclosing model"):
        torch_sttp.add_adapters(outer[0], "delta", rank=2, name="c")
    assert outer(X).shape == (5, 2)


def test_a_failed_load_keeps_the_active_adapter_and_the_trainable_flags(tmp_path):
    source = MLP()
    source.head = nn.Linear(8, 5)
    torch_sttp.add_adapters(source, "delta", rank=2, name="c", target=["fc1"], trainable=["head"])
    torch_sttp.save_adapters(source, tmp_path)
    model = MLP()
    torch_sttp.add_adapters(model, "delta", rank=2, name="a", target=["fc1", "fc2"])
    torch_sttp.add_adapters(model, "delta", rank=2, name="b", target=["fc1", "fc2"])
    _perturb(model)
    model.fc1.adapters["b"].u_reflectors.requires_grad_(False)  # frozen by hand: stays so
    flags, out = [p.requires_grad for p in model.parameters()], model(X).detach()
    with pytest.raises(ValueError, match="has shape"):
        torch_sttp.load_adapters(model, tmp_path)
    assert active_adapter(model) == "b"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model(X), out)


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.dec = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, i):
        return self.dec(self.emb(i))


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lm, self.body = TiedHead(), nn.Linear(10, 10)

    def forward(self, i):
        return self.body(self.lm(i))


def test_a_trainable_module_with_tied_weights_saves_and_loads_exactly(tmp_path):
    model = TiedModel()
    torch_sttp.add_adapters(model, "delta", rank=2, target=["body"], trainable=["lm"])
    _perturb(model)
    torch_sttp.save_adapters(model, tmp_path)
    loaded = torch_sttp.load_adapters(TiedModel(), tmp_path)
    copy = loaded.lm.copies["default"]
    assert copy.emb.weight is copy.dec.weight
    saved = _snapshot(model, "default")
    assert all(torch.equal(t, saved[k]) for k, t in torch_sttp.adapter_state_dict(loaded).items())
    i = torch.tensor([[1, 4, 7]])
    assert torch.equal(loaded(i), model(i))


def test_a_failed_save_writes_no_configuration(tmp_path, monkeypatch):
    import safetensors.torch

    model = MLP()
    torch_sttp.add_adapters(model, "delta", rank=2)

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        torch_sttp.save_adapters(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["principal", "delta", "rotation"])
def test_meta_weights_are_refused_before_anything_changes(kind):
    with torch.device("meta"):
        model = MLP()
    with pytest.raises(ValueError, match="'fc1' has its weights on the meta device; .* load them first"):
        torch_sttp.add_adapters(model, kind, rank=2)
    assert torch_sttp.adapters.adapter_record(model) is None and isinstance(model.fc1, nn.Linear)


def test_the_compiled_wrapper_is_named_in_the_error():
    model = torch_sttp.add_adapters(MLP(), "delta", rank=2)
    compiled = torch.compile(model)
    with pytest.raises(ValueError, match="merge_adapters: this is torch.compile's wrapper"):
        torch_sttp.merge_adapters(compiled)
    with pytest.raises(ValueError, match="adapters_disabled: this is torch.compile's wrapper"):
        with torch_sttp.adapters_disabled(compiled):
            pass


def test_error_messages_name_the_call_and_a_valid_rank(tmp_path):
    model = torch_sttp.add_adapters(MLP(), "delta", rank=2)
    with pytest.raises(ValueError, match=r"^save_adapters: no adapter named 'nope'"):
        torch_sttp.save_adapters(model, tmp_path, name="nope")
    with pytest.raises(ValueError, match=r"rank=1 \(use 2\)$"):
        torch_sttp.add_adapters(MLP(), "rotation", rank=1)
    with pytest.raises(ValueError, match="trainable pattern 'classifier' matches no module; the model's top-level"):
        torch_sttp.add_adapters(MLP(), "delta", rank=2, trainable=["classifier"])


def test_a_target_naming_a_container_adapts_the_weight_layers_inside_it():
    outer = nn.Sequential()
    outer.add_module("enc", MLP())
    outer.add_module("out", nn.Linear(3, 2))
    torch_sttp.add_adapters(outer, "delta", rank=2, target=["enc"], exclude=["*.head"])
    info = adapter_info(outer)
    assert sorted(info.layers) == ["enc.fc1", "enc.fc2"] and info.skipped == []
    assert isinstance(outer.out, nn.Linear)
    torch_sttp.unload_adapters(outer)
    torch_sttp.add_adapters(outer, "delta", rank=2, exclude=["enc"])  # an excluded container: none of its layers
    assert list(adapter_info(outer).layers) == ["out"]


def test_disabling_adapters_leaves_tensors_frozen_by_hand_frozen():
    model = torch_sttp.add_adapters(MLP(), "delta", rank=2, target=["fc1", "fc2"], trainable=["head"])
    model.fc1.adapters["default"].spectrum.requires_grad_(False)
    model.head.copies["default"].bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch_sttp.adapters_disabled(model):
        assert torch.equal(model(X), MLP()(X))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
