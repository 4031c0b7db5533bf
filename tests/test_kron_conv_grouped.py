"""Pointwise-A Kronecker conv as grouped conv + 1x1 mix: values and gradients vs F.conv2d with the
composed kernel sum_r kron(A_r, B_r), across geometries, ranks and memory formats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kron.layers.kron_conv_grouped import mixing_weight, pointwise_kron_conv

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def _full_fp32_precision():
    """cuDNN may run fp32 convolutions in TF32 by default; these tests compare in full fp32."""
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allow

# (R, F1, C1, F2, C2, kh, kw, stride, padding, dilation, H, W)
CASES = [
    (1, 2, 3, 4, 2, 3, 3, 1, 1, 1, 7, 7),
    (3, 3, 2, 2, 3, 3, 3, 2, 1, 1, 8, 9),  # Kronecker rank 3, stride 2
    (2, 2, 2, 3, 2, 3, 1, (2, 1), (1, 0), (1, 2), 9, 8),  # non-square kernel, per-axis geometry
    (2, 4, 1, 2, 3, 1, 1, 1, 0, 1, 5, 5),  # C1 = 1 (A is a pure output expansion), 1x1 B
    (2, 3, 4, 2, 2, 5, 3, 1, "same", 2, 9, 7),
]


def _case_id(c):
    return "R{}_A{}x{}_B{}x{}x{}x{}_s{}_p{}_d{}".format(*c[:10])


def _tensors(case, device, channels_last, seed=0):
    rank, f1, c1, f2, c2, kh, kw, *_, h, w = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, c1 * c2, h, w, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a = torch.randn(rank, f1, c1, 1, 1, generator=gen)
    b = torch.randn(rank, f2, c2, kh, kw, generator=gen)
    return [t.to(device).requires_grad_() for t in (x, a, b)]


def _dense(x, a, b, stride, padding, dilation):
    weight = sum(torch.kron(a[r], b[r]) for r in range(a.shape[0]))
    return F.conv2d(x, weight, None, stride, padding, dilation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_values_and_gradients_match_composed_conv(case, channels_last, device):
    stride, padding, dilation = case[7:10]
    x, a, b = _tensors(case, device, channels_last)
    y = pointwise_kron_conv(x, a, b, stride, padding, dilation)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
    y.backward(grad_y)

    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    ref = _dense(x64, a64, b64, stride, padding, dilation)
    ref.backward(grad_y.double())

    assert y.shape == ref.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(a.grad.double(), a64.grad, **tol)
    torch.testing.assert_close(b.grad.double(), b64.grad, **tol)


def test_mixing_weight_is_kron_of_a_and_identity():
    """Entry [(f1, g), (c1, r, f)] of the 1x1 weight is A_r[f1, c1] when g == f, else 0."""
    a = torch.randn(2, 3, 4, 1, 1)
    w = mixing_weight(a, 5).view(3, 5, 4, 2, 5)
    for f1, g, c1, r, f in [(0, 0, 0, 0, 0), (2, 4, 3, 1, 4), (1, 2, 0, 1, 2), (1, 2, 0, 1, 3)]:
        want = a[r, f1, c1, 0, 0] if g == f else torch.tensor(0.0)
        assert w[f1, g, c1, r, f] == want


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_returns_the_autocast_dtype(device):
    dtype = torch.bfloat16
    x, a, b = _tensors(CASES[1], device, channels_last=True, seed=2)
    with torch.autocast(device, dtype=dtype):
        y = pointwise_kron_conv(x, a, b, 2, 1, 1)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    ref = _dense(x.detach(), a.detach(), b.detach(), 2, 1, 1)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_bad_inputs_raise_one_line_errors():
    x, a, b = _tensors(CASES[0], "cpu", channels_last=False)
    with pytest.raises(ValueError, match=r"a \(R, F1, C1, 1, 1\)"):
        pointwise_kron_conv(x, a.expand(1, 2, 3, 2, 2), b)
    with pytest.raises(ValueError, match="C1\\*C2 channels"):
        pointwise_kron_conv(x[:, :5], a, b)
    with pytest.raises(ValueError, match="dtypes differ"):
        pointwise_kron_conv(x.double(), a, b)
