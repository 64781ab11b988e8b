"""Calibration statistics: masked Linear moments, shared inputs, Conv / ConvTranspose patches, Embedding counts,
save/load, flags, early stop, sensitivity."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_sttp.calibration import (
    Calibration,
    calibrate,
    forward_groups,
    layer_sensitivity,
    patches,
    sequential_statistics,
    transposed_patches,
)
from torch_sttp.layers import weight_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


class Attention(nn.Module):
    """Embedding → query/key/value on the same tensor → output projection (a tokenizer-style dict input)."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.query, self.key, self.value = nn.Linear(dim, 4), nn.Linear(dim, 4), nn.Linear(dim, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        q, k, v = self.query(h), self.key(h), self.value(h)
        scores = (q @ k.mT).masked_fill(~attention_mask.bool()[:, None, :], -1e9).softmax(-1)
        return self.out(scores @ v)


def _batches(n=3, b=4, t=5, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (b, t), generator=g)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_linear_moments_leave_out_masked_positions_and_shared_inputs_are_stored_once():
    torch.manual_seed(0)
    model, batches = Attention().double(), _batches()
    stats = calibrate(model, batches)
    rows = torch.cat([model.emb(b["input_ids"])[b["attention_mask"].bool()] for b in batches]).detach()
    assert stats.samples("query") == rows.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
    torch.testing.assert_close(stats.moment("query"), rows.T @ rows / rows.shape[0], rtol=1e-12, atol=1e-14)
    assert stats.shared("key") == ["query", "key", "value"]
    assert stats.key("value") == "query" and torch.equal(stats.total("key"), stats.total("query"))
    # stored once per group, matrices as upper triangles: counts (11) + 6·7/2 (query/key/value) + 4·5/2 (out)
    assert stats.nbytes == 8 * (11 + 21 + 10)
    assert stats.groups() == [["emb"], ["query", "key", "value"], ["out"]]
    assert stats.names == ["emb", "query", "key", "value", "out"]
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    assert torch.equal(stats.total("emb"), torch.bincount(ids, minlength=11).double())
    torch.testing.assert_close(stats.moment("emb").sum(), torch.tensor(1.0, dtype=torch.float64))
    assert stats.total("out").dtype == torch.float64


def test_conv_statistic_equals_an_explicit_unfold():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2).double()
    xs = [torch.randn(2, 4, 9, 8, dtype=torch.float64) for _ in range(2)]
    stats = calibrate(conv, xs)
    cols = []
    for x in xs:
        u = F.unfold(x, 3, dilation=2, padding=1, stride=2)  # (B, C·9, L), channel-major like the weight
        u = u.reshape(2, 2, 2 * 9, -1).permute(0, 3, 1, 2).reshape(-1, 18)  # one row per (position, group)
        cols.append(u)
    cols = torch.cat(cols)
    torch.testing.assert_close(stats.moment(""), cols.T @ cols / cols.shape[0], rtol=1e-12, atol=1e-14)
    assert stats.samples("") == cols.shape[0]


@pytest.mark.parametrize("conv,shape", [
    (lambda: nn.Conv1d(3, 5, 4, stride=3, padding=2, padding_mode="circular"), (2, 3, 11)),
    (lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(2, 1)), (2, 2, 5, 6)),
    (lambda: nn.Conv2d(2, 4, 3, padding=2, padding_mode="reflect", groups=2), (2, 2, 5, 6)),
    (lambda: nn.Conv3d(2, 3, (2, 3, 1), stride=(1, 2, 1), padding=1), (2, 2, 5, 6, 4)),
])
def test_patches_reproduce_the_convolution(conv, shape):
    torch.manual_seed(2)
    m, x = conv().double(), torch.randn(*shape, dtype=torch.float64)
    y, n, g = m(x), x.dim() - 2, m.groups
    w = weight_matrix(m).detach().reshape(g, -1, weight_matrix(m).shape[1])
    p = patches(m, x).reshape(x.shape[0], *y.shape[2:], g, -1)
    z = torch.einsum("...gd,god->...go", p, w).reshape(x.shape[0], *y.shape[2:], -1).movedim(-1, 1)
    torch.testing.assert_close(z + m.bias.view(1, -1, *[1] * n), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("conv,shape", [
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 5, 4)),
    (lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=(3, 2), padding=(2, 0), dilation=(2, 1), groups=2), (2, 4, 5, 4)),
    (lambda: nn.ConvTranspose1d(3, 2, 5, stride=2, padding=4), (2, 3, 7)),
    (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 3, 3, 2)),
])
def test_transposed_patches_reproduce_the_transposed_convolution(conv, shape):
    torch.manual_seed(3)
    m, x = conv().double(), torch.randn(*shape, dtype=torch.float64)
    y, n, g = m(x), x.dim() - 2, m.groups
    w = weight_matrix(m).detach()  # (C_out/g, C_in·K)
    z = transposed_patches(m, x).reshape(x.shape[0], *y.shape[2:], -1)
    block = z.shape[-1] // g
    outs = [z[..., i * block:(i + 1) * block] @ w[:, i * block:(i + 1) * block].T for i in range(g)]
    out = torch.cat(outs, -1).movedim(-1, 1) + m.bias.view(1, -1, *[1] * n)
    torch.testing.assert_close(out, y, rtol=0, atol=1e-12)
    stats = calibrate(m, [x])
    moment = stats.moment("")
    flat = z.reshape(-1, z.shape[-1])
    full = flat.T @ flat / flat.shape[0]
    group = torch.arange(full.shape[0]) // block
    torch.testing.assert_close(moment, full * (group[:, None] == group[None, :]), rtol=1e-12, atol=1e-14)
    # the statistic is the metric of the output error: Σ_q ‖(W − Ŵ) z_q‖² over the groups
    d = torch.randn_like(w)
    err = sum(((flat[:, i * block:(i + 1) * block] @ d[:, i * block:(i + 1) * block].T) ** 2).sum() for i in range(g))
    torch.testing.assert_close(err / flat.shape[0], torch.trace(d @ moment @ d.T), rtol=1e-10, atol=0)


def test_save_and_load_are_bit_exact(tmp_path):
    torch.manual_seed(4)
    model, batches = Attention().double(), _batches(seed=4)
    stats = calibrate(model, batches)
    stats.save(tmp_path / "stats.safetensors")
    back = Calibration.load(tmp_path / "stats.safetensors")
    assert back.names == stats.names
    for n in stats.names:
        assert back.key(n) == stats.key(n) and back.kind(n) == stats.kind(n) and back.samples(n) == stats.samples(n)
        assert torch.equal(back.total(n), stats.total(n)) and back.total(n).dtype == torch.float64
    assert back.shared("query") == ["query", "key", "value"]
    with pytest.raises(ValueError, match="not a torch-sttp calibration file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
        Calibration.load(tmp_path / "other.safetensors")


def test_flags_restored_no_gradients_and_stop_early():
    torch.manual_seed(5)
    model, batches = Attention(), _batches(seed=5)
    model.train()
    model.out.eval()
    ran = []
    model.out.register_forward_hook(lambda *a: ran.append(1))
    stats = calibrate(model, batches, layers=["query", "value"], stop_early=True)
    assert stats.names == ["query", "value"] and not ran  # the forward stopped before the output projection
    assert model.training and model.query.training and not model.out.training
    assert all(p.grad is None for p in model.parameters())
    assert forward_groups(model, batches[0], include=nn.Linear) == [["query", "key", "value"], ["out"]]


def test_bad_input_is_refused_with_the_layer_named():
    model = Attention()
    with pytest.raises(ValueError, match="no layer selected"):
        calibrate(model, _batches(), include=nn.Linear, exclude=nn.Linear)
    unused = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    unused.forward = lambda x: unused["a"](x)
    with pytest.raises(ValueError, match=r"\['b'\] never ran"):
        calibrate(unused, [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="cannot calibrate 'nothing'"):
        calibrate(model, _batches(), layers=["nothing"])

    class Switch(nn.Module):  # a and b share their input in the first batch only
        def __init__(self):
            super().__init__()
            self.a, self.b, self.calls = nn.Linear(3, 2), nn.Linear(3, 2), 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else x * 2)

    with pytest.raises(ValueError, match="'a' and 'b' shared their input"):
        calibrate(Switch(), [torch.randn(2, 3), torch.randn(2, 3)])


def test_sequential_statistics_see_the_model_as_the_caller_left_it():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    xs = [torch.randn(6, 4, dtype=torch.float64) for _ in range(2)]
    seen = []
    for group, stats in sequential_statistics(model, xs, ["0", "2"]):
        seen.append(group)
        if group == ["0"]:
            with torch.no_grad():
                model[0].weight.mul_(0.5)
        else:
            h = torch.cat([torch.tanh(model[0](x)) for x in xs]).detach()
            torch.testing.assert_close(stats.moment("2"), h.T @ h / h.shape[0], rtol=1e-12, atol=1e-14)
    assert seen == [["0"], ["2"]]
    with pytest.raises(ValueError, match="re-iterable"):
        next(sequential_statistics(model, iter(xs), ["0"]))


def test_sensitivity_is_the_jacobian_norm_per_output():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False)).double()
    xs = [torch.randn(4000, 5, dtype=torch.float64) for _ in range(2)]
    s = layer_sensitivity(model, xs)
    # layer 1's output reaches the model's output through W2: E‖W2ᵀv‖² / 4 = ‖W2‖²_F / 4; layer 2 is the output
    expected = float((model[1].weight.detach() ** 2).sum()) / 4
    assert s["0"] == pytest.approx(expected, rel=0.05)
    assert s["1"] == pytest.approx(1.0, rel=0.05)
    assert all(p.grad is None for p in model.parameters())


def test_sensitivity_equals_the_hutchinson_sum_of_each_layers_output_gradient():
    # the per-batch probe v ~ N(0, I) drawn from a generator seeded with `seed`; s_l = Σ_t ‖(∂vᵀy/∂o_l)_t‖² / d_out
    # over the unmasked columns t, divided by their count — computed here with one autograd.grad per layer
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    batches = [torch.randn(7, 6, dtype=torch.float64) for _ in range(3)]
    s = layer_sensitivity(model, batches, layers=["0", "2"], seed=11)
    generator = torch.Generator().manual_seed(11)
    totals, counts = {"0": 0.0, "2": 0.0}, {"0": 0, "2": 0}
    for x in batches:
        h0 = model[0](x)
        y = model[2](model[1](h0))
        v = torch.randn(y.shape, generator=generator).to(y)
        g0, g2 = torch.autograd.grad((y * v).sum(), [h0, y])
        for name, g in (("0", g0), ("2", g2)):
            totals[name] += float((g ** 2).sum()) / g.shape[1]
            counts[name] += g.shape[0]
    assert s == pytest.approx({n: totals[n] / counts[n] for n in totals}, rel=1e-12)
    assert all(p.grad is None for p in model.parameters())
