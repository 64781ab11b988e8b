"""Products of Householder reflectors applied without forming them: :func:`torch_sttp.frames.householder_t`,
:func:`~torch_sttp.frames.householder_ts_grouped` and :func:`~torch_sttp.frames.apply_householder`."""
from __future__ import annotations

import pytest
import torch

from torch_sttp import frames
from torch_sttp.frames import apply_householder, householder_t, householder_ts_grouped

F64 = torch.float64


def dense_product(y: torch.Tensor) -> torch.Tensor:
    """H = ∏_j (I − 2·y_j y_jᵀ/‖y_j‖²) by explicit d×d products (the reference)."""
    d = y.shape[0]
    h = torch.eye(d, dtype=y.dtype)
    for j in range(y.shape[1]):
        v = y[:, j:j + 1]
        h = h @ (torch.eye(d, dtype=y.dtype) - 2.0 * (v @ v.T) / (v.T @ v))
    return h


@pytest.mark.parametrize("d, r", [(7, 4), (5, 5), (9, 1), (6, 8)])
def test_apply_equals_dense_product(d, r):
    g = torch.Generator().manual_seed(d * 10 + r)
    y = torch.randn(d, r, generator=g, dtype=F64)
    x = torch.randn(3, 4, d, generator=g, dtype=F64)
    h = dense_product(y)
    t = householder_t(y)
    torch.testing.assert_close(apply_householder(x, y, t), x @ h, rtol=0, atol=1e-13)
    torch.testing.assert_close(apply_householder(x, y, t.mT), x @ h.T, rtol=0, atol=1e-13)
    torch.testing.assert_close(apply_householder(x, y), x @ h, rtol=0, atol=1e-13)  # t computed inside
    assert torch.equal(t.tril(-1), torch.zeros_like(t))  # T is upper triangular


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (F64, 1e-13)])
def test_product_is_orthogonal(dtype, tol):
    y = torch.randn(40, 12, generator=torch.Generator().manual_seed(0), dtype=dtype) * 3.0
    h = apply_householder(torch.eye(40, dtype=dtype), y)  # rows of I·H: H itself, only in this test
    torch.testing.assert_close(h.T @ h, torch.eye(40, dtype=dtype), rtol=0, atol=tol)


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(3, 6, 4, generator=g, dtype=F64)
    x = torch.randn(3, 5, 6, generator=g, dtype=F64)
    t = householder_t(y)
    out = apply_householder(x, y, t)
    for i in range(3):
        torch.testing.assert_close(t[i], householder_t(y[i]), rtol=0, atol=1e-15)
        torch.testing.assert_close(out[i], x[i] @ dense_product(y[i]), rtol=0, atol=1e-13)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(7, 4, generator=g, dtype=F64, requires_grad=True)
    t = householder_t(y.detach()).requires_grad_()
    assert torch.autograd.gradcheck(apply_householder, (x, y, t))
    assert torch.autograd.gradgradcheck(apply_householder, (x, y, t))
    assert torch.autograd.gradcheck(lambda a, b: apply_householder(a, b), (x, y))  # through T(Y)
    assert torch.autograd.gradcheck(lambda a, b: apply_householder(a, b, householder_t(b).mT), (x, y))
    xb = torch.randn(2, 3, 7, generator=g, dtype=F64, requires_grad=True)
    yb = torch.randn(2, 7, 3, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: apply_householder(a, b), (xb, yb))


def test_hand_written_backward_matches_autograd_of_the_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(8, 3, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(6, 8, generator=g, dtype=F64)
    ours = torch.autograd.grad((apply_householder(x, y) * w).sum(), (x, y))
    t = householder_t(y)
    plain = x - ((x @ y) @ t) @ y.T
    ref = torch.autograd.grad((plain * w).sum(), (x, y))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_grouped_t_batches_by_shape(monkeypatch):
    g = torch.Generator().manual_seed(4)
    ys = [torch.randn(6, 4, generator=g, dtype=F64), torch.randn(9, 2, generator=g, dtype=F64),
          torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64)]
    calls = []
    real = frames.householder_t
    monkeypatch.setattr(frames, "householder_t", lambda y: calls.append(tuple(y.shape)) or real(y))
    ts = householder_ts_grouped(ys)
    assert sorted(calls) == [(3, 6, 4), (9, 2)]  # one stacked call for the three (6, 4), one for (9, 2)
    for y, t in zip(ys, ts):
        torch.testing.assert_close(t, real(y), rtol=0, atol=1e-15)


def test_autocast_runs_in_the_autocast_dtype_and_t_in_float32():
    y = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(6), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = householder_t(y)
        z = apply_householder(x, y, t)
    assert t.dtype == torch.float32 and z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), apply_householder(x, y, t), rtol=0, atol=5e-2)
    z.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"x \(3, 5\), y \(6, 2\)"):
        apply_householder(torch.zeros(3, 5), torch.ones(6, 2))
