import pytest
import torch
import torch.nn as nn

from torch_sttp.experiments.models import (
    MODELS,
    CNN1d,
    SmallCNN,
    SNGANDiscriminator,
    SNGANGenerator,
    WideResNet,
    build_model,
    state_dict_numel,
)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# Exact state-dict sizes of the full models (architectures.md)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("sngan32-d", {}, 1_053_824),
        ("sngan32-g", {}, 4_280_323),
        ("sngan48-d", {}, 10_141_440),
        ("sngan32-d-reduced", {}, 66_848),
        ("sngan48-d-reduced", {}, 40_080),
        ("wrn28-10", {}, 36_507_242),
    ],
)
def test_state_dict_counts(name, kwargs, expected):
    torch.manual_seed(0)
    assert state_dict_numel(build_model(name, **kwargs)) == expected


def test_reduced_equals_explicit_ndf():
    assert state_dict_numel(SNGANDiscriminator(32, ndf=32)) == 66_848
    assert state_dict_numel(SNGANDiscriminator(48, ndf=64)) == 40_080
    assert build_model("sngan32-d-reduced").ndf == 32
    assert build_model("sngan48-d-reduced").ndf == 64
    # explicit override still wins
    assert build_model("sngan32-d-reduced", ndf=16).ndf == 16


def test_state_dict_numel_counts_buffers_but_not_num_batches_tracked():
    bn = nn.BatchNorm2d(4)
    assert "num_batches_tracked" in bn.state_dict()
    assert state_dict_numel(bn) == 16  # weight, bias, running_mean, running_var
    assert state_dict_numel(nn.Linear(3, 2)) == 8
    assert state_dict_numel(nn.Linear(3, 2, bias=False)) == 6


def test_sngan_structure_details():
    g = SNGANGenerator(32)
    assert isinstance(g.noise_to_conv, nn.Linear) and g.noise_to_conv.bias is not None
    assert g.noise_to_conv.weight.shape == (4 * 4 * 256, 128)
    assert len(g.blocks) == 3
    d = SNGANDiscriminator(32)
    assert d.fc.bias is None and d.fc.weight.shape == (1, 128)
    # preset 32: only the downsampling block has a learned shortcut
    assert [b.shortcut is not None for b in d.blocks] == [True, False, False]
    d48 = SNGANDiscriminator(48)
    assert [b.shortcut is not None for b in d48.blocks] == [True, True, True, True]
    assert [b.downsample for b in d48.blocks] == [True, True, True, False]
    assert d48.first_block.conv1.weight.shape == (64, 3, 3, 3)
    assert d48.fc.weight.shape == (1, 1024)
    g48 = SNGANGenerator(48)
    assert g48.noise_to_conv.weight.shape == (6 * 6 * 512, 128)
    assert g48.final_conv.weight.shape == (3, 64, 3, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Forward shapes
# ---------------------------------------------------------------------------------------------------------------------


def test_generator_preset32_full_forward_range():
    torch.manual_seed(0)
    g = SNGANGenerator(32)
    z = 3.0 * torch.randn(2, 128)
    with torch.no_grad():
        x = g(z)
    assert x.shape == (2, 3, 32, 32)
    assert x.min() >= -1.0 and x.max() <= 1.0


@pytest.mark.parametrize(
    "preset, kwargs, shape",
    [
        (32, dict(ngf=16), (2, 3, 32, 32)),
        (32, dict(ngf=8, nz=8, channels=1), (2, 1, 32, 32)),
        (32, dict(ngf=8, image_size=16), (2, 3, 16, 16)),
        (48, dict(ngf=32), (2, 3, 48, 48)),
        (48, dict(ngf=16, bottom_width=4, channels=1), (2, 1, 32, 32)),
    ],
)
def test_generator_small_forward(preset, kwargs, shape):
    torch.manual_seed(0)
    g = SNGANGenerator(preset, **kwargs)
    z = 5.0 * g.sample_noise(shape[0])
    x = g(z)
    assert x.shape == shape
    assert x.min() >= -1.0 and x.max() <= 1.0
    x.sum().backward()
    assert g.noise_to_conv.weight.grad is not None
    g.eval()
    with torch.no_grad():
        assert g(z).shape == shape


def test_generator_rejects_bad_latent_and_sizes():
    g = SNGANGenerator(32, ngf=16)
    with pytest.raises(ValueError):
        g(torch.randn(2, 7))
    with pytest.raises(ValueError):
        SNGANGenerator(32, ngf=16, image_size=30)
    with pytest.raises(ValueError):
        SNGANGenerator(48, ngf=12)  # not divisible by 8


def test_discriminator_full_preset32_forward():
    torch.manual_seed(0)
    d = SNGANDiscriminator(32)
    with torch.no_grad():
        y = d(torch.randn(2, 3, 32, 32))
    assert y.shape == (2,)


@pytest.mark.parametrize(
    "preset, kwargs, inp",
    [
        (32, dict(ndf=16), (4, 3, 32, 32)),
        (32, dict(ndf=16, channels=1), (4, 1, 32, 32)),
        (48, dict(ndf=64), (4, 3, 48, 48)),
        (48, dict(ndf=64, channels=1), (2, 1, 32, 32)),
        (32, dict(ndf=16, spectral_norm=True), (2, 3, 32, 32)),
    ],
)
def test_discriminator_small_forward(preset, kwargs, inp):
    torch.manual_seed(0)
    d = SNGANDiscriminator(preset, **kwargs)
    y = d(torch.randn(*inp))
    assert y.shape == (inp[0],)
    y.sum().backward()
    assert all(p.grad is not None for p in d.parameters())


def test_gan_pair_composes():
    torch.manual_seed(0)
    g = build_model("sngan32-g", ngf=16, nz=16, channels=1)
    d = build_model("sngan32-d", ndf=16, channels=1)
    logits = d(g(g.sample_noise(3)))
    assert logits.shape == (3,)


@pytest.mark.parametrize(
    "depth, widen, in_channels, num_classes, size",
    [(10, 1, 3, 10, 32), (16, 1, 1, 7, 28)],
)
def test_wrn_small_forward(depth, widen, in_channels, num_classes, size):
    torch.manual_seed(0)
    m = WideResNet(depth=depth, widen=widen, num_classes=num_classes, in_channels=in_channels, dropout=0.1)
    out = m(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, num_classes)
    out.sum().backward()


def test_wrn_structure():
    m = WideResNet(28, 10)
    assert [len(g) for g in m.groups] == [4, 4, 4]
    shortcuts = [b.shortcut is not None for g in m.groups for b in g]
    assert shortcuts == [True, False, False, False] * 3
    assert m.conv_in.weight.shape == (16, 3, 3, 3) and m.conv_in.bias is not None
    assert m.fc.weight.shape == (10, 640)
    assert m.groups[1][0].conv2.stride == (2, 2) and m.groups[2][0].conv2.stride == (2, 2)
    with pytest.raises(ValueError):
        WideResNet(depth=27)


def test_cnn1d():
    torch.manual_seed(0)
    m = build_model("cnn1d")
    assert sum(p.numel() for p in m.parameters()) < 50_000
    x = torch.randn(5, 40)
    out = m(x)
    assert out.shape == (5, 10)
    assert torch.allclose(m(x.unsqueeze(1)), out)


@pytest.mark.parametrize("size", [28, 32])
def test_small_cnn(size):
    torch.manual_seed(0)
    m = build_model("small-cnn")
    assert state_dict_numel(m) <= 100_000
    out = m(torch.randn(4, 1, size, size))
    assert out.shape == (4, 10)
    assert isinstance(m, SmallCNN)


def test_registry():
    expected = {
        "sngan32-g",
        "sngan32-d",
        "sngan32-d-reduced",
        "sngan48-g",
        "sngan48-d",
        "sngan48-d-reduced",
        "wrn28-10",
        "cnn1d",
        "small-cnn",
    }
    assert expected <= set(MODELS)
    with pytest.raises(KeyError):
        build_model("no-such-model")
    assert isinstance(build_model("wrn28-10", depth=10, widen=1), WideResNet)
    assert build_model("wrn28-10", depth=10, widen=1).depth == 10
    assert isinstance(build_model("cnn1d", width=8), CNN1d)
    g = build_model("sngan48-g", ngf=32)
    assert isinstance(g, SNGANGenerator) and g.preset == 48 and g.image_size == 48
