"""State_dicts and training states written by commit 1637de1 (tests/fixtures/legacy_1637de1) load into models
converted with the same settings and give that code's outputs (float64; fixtures made by make_legacy_1637de1.py)."""
import importlib.util
from pathlib import Path

import pytest
import torch

import torch_sttp
from torch_sttp.checkpoint import load_training_state

HERE = Path(__file__).parent / "fixtures"
FIXTURES = HERE / "legacy_1637de1"
_spec = importlib.util.spec_from_file_location("make_legacy_1637de1", HERE / "make_legacy_1637de1.py")
legacy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(legacy)


def _fresh(method, spectrum):
    torch.manual_seed(123)  # other values than the fixture's: loading must overwrite everything
    model = legacy.Legacy().double()
    return torch_sttp.convert(model, method=method, rank=3, spectrum=spectrum)


@pytest.mark.parametrize("method", ["svdp", "sttp"])
@pytest.mark.parametrize("spectrum", ["identity", "normalized", "free"])
def test_legacy_state_dict_loads_with_same_outputs(method, spectrum):
    saved = torch.load(FIXTURES / f"{method}-{spectrum}.pt", weights_only=True)
    model = _fresh(method, spectrum)
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        text, img = model(saved["tokens"], saved["image"])
    torch.testing.assert_close(text, saved["text"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(img, saved["img"], rtol=1e-12, atol=1e-12)


def test_legacy_state_dict_refuses_other_settings():
    saved = torch.load(FIXTURES / "sttp-free.pt", weights_only=True)
    model = _fresh("svdp", "free")
    with pytest.raises(ValueError, match="another parametrization"):
        model.load_state_dict(saved["state_dict"])


def test_legacy_training_state_loads():
    model = _fresh("sttp", "normalized")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    state = load_training_state(FIXTURES / "training-state.ckpt", model, opt)
    assert state.step == 1 and state.extra == {"note": "legacy"}
    assert all(len(s) for s in opt.state.values()) and len(opt.state) == len(list(model.parameters()))
    expected = torch.load(FIXTURES / "training-state-outputs.pt", weights_only=True)
    tokens, image = legacy.inputs()
    with torch.no_grad():
        text, img = model(tokens, image)
    torch.testing.assert_close(text, expected["text"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(img, expected["img"], rtol=1e-12, atol=1e-12)
