"""Low-rank baselines: exactness, optimal fits, init variance, gradients, MAC counts."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kron.layers.cp import CPConv2d, cp_max_rank
from kron.layers.cp_als import cp_als, cp_exact, cp_to_tensor
from kron.layers.errors import FactorizationError
from kron.layers.lowrank import LowRankLinear, SeparableConv2d, TuckerConv2d

F64 = torch.float64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (kernel_size, stride, padding, dilation): square and non-square, strided, padded, dilated.
GEOMETRIES = [
    ((3, 3), 1, 1, 1),
    ((3, 5), (2, 1), (1, 2), 1),
    ((2, 3), 1, 0, (2, 1)),
    ((5, 3), (1, 2), (2, 0), (1, 2)),
    ((1, 1), 2, 0, 1),
    ((3, 3), 1, "same", 2),
    ((4, 2), 3, "valid", 1),
]
CONV_LAYERS = ["separable", "cp", "tucker"]


def count_macs(module: nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward as FlopCounterMode sees them (same semantics as kron.measure)."""
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def make_conv(kind: str, c: int, f: int, kernel, rank: int = 3, **kwargs) -> nn.Module:
    if kind == "separable":
        return SeparableConv2d(c, f, kernel, rank, **kwargs)
    if kind == "cp":
        return CPConv2d(c, f, kernel, rank, **kwargs)
    return TuckerConv2d(c, f, kernel, (min(rank, c), min(rank + 1, f)), **kwargs)


def dense_conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(
        x, layer.dense_weight(), layer.bias, layer.stride, layer.padding, layer.dilation
    )


def tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).detach().norm() / exact.detach().norm())


# --- forward equals the dense op on dense_weight() ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (12,)])
def test_lowrank_linear_forward(dtype, bias, shape):
    torch.manual_seed(0)
    layer = LowRankLinear(12, 7, 4, bias=bias, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(
        layer(x), F.linear(x, layer.dense_weight(), layer.bias), **tol(dtype)
    )
    assert layer.dense_weight().shape == (7, 12)


@pytest.mark.parametrize("kind", CONV_LAYERS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_forward(kind, geometry, dtype, bias):
    torch.manual_seed(0)
    kernel, stride, padding, dilation = geometry
    layer = make_conv(
        kind,
        5,
        6,
        kernel,
        3,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
        dtype=dtype,
    )
    x = torch.randn(2, 5, 11, 10, dtype=dtype)
    out = layer(x)
    torch.testing.assert_close(out, dense_conv(layer, x), **tol(dtype))
    assert layer.dense_weight().shape == (6, 5, *kernel)
    ref = nn.Conv2d(5, 6, kernel, stride, padding, dilation, bias=bias, dtype=dtype)
    assert out.shape == ref(x).shape  # same geometry as nn.Conv2d, 'same'/'valid' included


@pytest.mark.parametrize("kind", CONV_LAYERS)
def test_conv_channels_last_and_unbatched(kind):
    torch.manual_seed(0)
    layer = make_conv(kind, 6, 8, (3, 2), 4, stride=(1, 2), padding=(1, 1), dtype=F64)
    x = torch.randn(3, 6, 9, 9, dtype=F64)
    expected = dense_conv(layer, x)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), expected)
    layer_cl = layer.to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer_cl(x.to(memory_format=torch.channels_last)), expected)
    torch.testing.assert_close(layer(x[0]), expected[0])


# --- fits from dense layers --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_lowrank_linear_fit_is_optimal(dtype, rank):
    torch.manual_seed(1)
    dense = nn.Linear(40, 24, dtype=dtype)
    layer = LowRankLinear.from_linear(dense, rank)
    s = torch.linalg.svdvals(dense.weight.detach().to(F64))
    optimum = float((s[rank:] ** 2).sum())
    err = float(
        ((layer.dense_weight().detach().to(F64) - dense.weight.detach().to(F64)) ** 2).sum()
    )
    assert err == pytest.approx(optimum, rel=1e-5)
    assert layer.weight_u.dtype == dtype and torch.equal(layer.bias, dense.bias)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("rank", [1, 4, 9])
@pytest.mark.parametrize("kernel", [(3, 3), (3, 2)])
def test_separable_fit_is_optimal(dtype, rank, kernel):
    torch.manual_seed(2)
    conv = nn.Conv2d(5, 6, kernel, dtype=dtype)
    layer = SeparableConv2d.from_conv(conv, rank)
    kh, kw = kernel
    w = conv.weight.detach().to(F64)
    s = torch.linalg.svdvals(w.permute(1, 2, 0, 3).reshape(5 * kh, 6 * kw))
    optimum = float((s[rank:] ** 2).sum())
    err = float(((layer.dense_weight().detach().to(F64) - w) ** 2).sum())
    assert err == pytest.approx(optimum, rel=1e-5)


def low_rank_kernels() -> dict[str, torch.Tensor]:
    """(7, 6, 3, 2) kernels built by each model's definition (not by the layers' code), with
    their model ranks: separable 4, CP 3, Tucker-2 (2, 3)."""
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    sep = rnd(6 * 3, 4) @ rnd(4, 7 * 2)  # rank 4 as a (c, i) x (f, j) matrix
    cp = sum(
        rnd(7)[:, None, None, None] * rnd(6)[None, :, None, None] * rnd(3)[None, None, :, None]
        * rnd(2)[None, None, None, :]
        for _ in range(3)
    )
    core, u_out, u_in = rnd(3, 2, 3, 2), rnd(7, 3), rnd(6, 2)
    tucker = (u_out @ core.permute(2, 3, 0, 1) @ u_in.T).permute(2, 3, 0, 1)
    return {
        "separable": sep.reshape(6, 3, 7, 2).permute(2, 0, 1, 3),
        "cp": cp,
        "tucker": tucker,
    }


def test_exact_recovery_of_low_rank_weights():
    g = torch.Generator().manual_seed(3)
    linear = nn.Linear(20, 16, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 3, generator=g, dtype=F64)
                            @ torch.randn(3, 20, generator=g, dtype=F64))
    assert rel_err(LowRankLinear.from_linear(linear, 3).dense_weight(), linear.weight) < 1e-12
    assert rel_err(LowRankLinear.from_linear(linear, 2).dense_weight(), linear.weight) > 1e-3

    kernels = low_rank_kernels()
    for kind, rank, too_small in [
        ("separable", 4, 3), ("cp", 3, 2), ("tucker", (2, 3), (2, 2)), ("tucker", (4, 5), (1, 3))
    ]:
        cls = {"separable": SeparableConv2d, "cp": CPConv2d, "tucker": TuckerConv2d}[kind]
        conv = nn.Conv2d(6, 7, (3, 2), dtype=F64)
        with torch.no_grad():
            conv.weight.copy_(kernels[kind])
        assert rel_err(cls.from_conv(conv, rank).dense_weight(), conv.weight) < 1e-8, kind
        assert rel_err(cls.from_conv(conv, too_small).dense_weight(), conv.weight) > 1e-3, kind


@pytest.mark.parametrize("kind", ["linear", "separable", "cp", "tucker"])
def test_dense_weight_is_the_impulse_response(kind):
    """``dense_weight()`` read off the layer's own staged forward: a conv without bias, stride,
    padding or dilation maps a one-hot ``(c, i, j)`` input of kernel size to ``W[:, c, i, j]``."""
    torch.manual_seed(15)
    if kind == "linear":
        layer, eye = LowRankLinear(6, 5, 2, bias=False, dtype=F64), torch.eye(6, dtype=F64)
        torch.testing.assert_close(layer.dense_weight(), layer(eye).T, rtol=1e-12, atol=1e-12)
        return
    layer = make_conv(kind, 3, 5, (3, 2), 2, bias=False, dtype=F64)
    eye = torch.eye(3 * 3 * 2, dtype=F64).reshape(-1, 3, 3, 2)
    response = layer(eye).reshape(3, 3, 2, 5).permute(3, 0, 1, 2)
    torch.testing.assert_close(layer.dense_weight(), response, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "build,params",
    [  # counted by hand: factor sizes plus the bias (5 or 6 or 9 entries)
        (lambda: LowRankLinear(12, 9, 4), 4 * 12 + 9 * 4 + 9),  # 93
        (lambda: SeparableConv2d(5, 6, (3, 2), 3), 3 * 5 * 3 + 6 * 3 * 2 + 6),  # 87
        (lambda: CPConv2d(5, 6, (3, 2), 3), 3 * 5 + 3 * 3 + 3 * 2 + 6 * 3 + 6),  # 54
        (lambda: TuckerConv2d(5, 6, (3, 2), (2, 3)), 2 * 5 + 3 * 2 * 3 * 2 + 6 * 3 + 6),  # 70
        (lambda: TuckerConv2d(5, 6, (3, 2), (2, 3), bias=False), 64),
    ],
)
def test_parameter_counts(build, params):
    assert sum(p.numel() for p in build().parameters()) == params


@pytest.mark.parametrize("shape,rank", [((8, 6, 3, 3), 3), ((16, 12, 3, 3), 8), ((6, 4, 3, 1), 2)])
def test_cp_als_recovers_exact_rank(shape, rank):
    gen = torch.Generator().manual_seed(4)
    target = cp_to_tensor([torch.randn(n, rank, generator=gen, dtype=F64) for n in shape])
    factors, errors = cp_als(target, rank)
    assert errors[-1] < 1e-8
    assert rel_err(cp_to_tensor(factors), target) < 1e-8


def test_cp_als_monotone_and_deterministic():
    torch.manual_seed(5)
    target = torch.randn(12, 10, 3, 3, dtype=F64)
    factors, errors = cp_als(target, 6, n_iter_max=200)
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < errors[0] < 1.0
    again, errors_again = cp_als(target, 6, n_iter_max=200)
    assert errors == errors_again and all(
        torch.equal(a, b) for a, b in zip(factors, again, strict=True)
    )
    # more components fit better (on this tensor; ALS gives no such guarantee in general)
    fits = [cp_als(target, r, n_iter_max=200)[1][-1] for r in (2, 6, 12)]
    assert fits[0] > fits[1] > fits[2]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cp_from_conv_matches_tensorly():
    tensorly = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    torch.manual_seed(6)
    conv = nn.Conv2d(8, 10, 3, dtype=F64)
    ours = rel_err(CPConv2d.from_conv(conv, 6).dense_weight(), conv.weight)
    weight = conv.weight.detach().numpy()
    # tltorch (imported by another test) switches TensorLy's global backend to pytorch
    with tensorly.backend_context("numpy"):
        cp = parafac(weight, 6, init="svd", n_iter_max=1000, tol=1e-10)
        theirs = float(
            ((tensorly.cp_to_tensor(cp) - weight) ** 2).sum() ** 0.5 / (weight**2).sum() ** 0.5
        )
    assert ours <= theirs * 1.05


def test_cp_exact_at_max_rank():
    torch.manual_seed(7)
    target = torch.randn(5, 4, 3, 2, dtype=F64)
    factors = cp_exact(target)
    assert factors[0].shape[1] == cp_max_rank(5, 4, 3, 2) == 24
    assert rel_err(cp_to_tensor(factors), target) < 1e-14


@pytest.mark.parametrize("ranks", [(1, 1), (2, 5), (4, 3), (6, 7)])
def test_tucker_hosvd_is_the_leading_subspace_projection(ranks):
    torch.manual_seed(8)
    conv = nn.Conv2d(6, 7, (3, 2), dtype=F64)
    w = conv.weight.detach()
    r_in, r_out = ranks
    u0, s0, _ = torch.linalg.svd(w.reshape(7, -1), full_matrices=False)
    u1, s1, _ = torch.linalg.svd(w.transpose(0, 1).reshape(6, -1), full_matrices=False)
    p_out = u0[:, :r_out] @ u0[:, :r_out].T
    p_in = u1[:, :r_in] @ u1[:, :r_in].T
    projected = torch.einsum("fcij,gf,dc->gdij", w, p_out, p_in)
    fitted = TuckerConv2d.from_conv(conv, ranks).dense_weight().detach()
    err2 = float(((fitted - w) ** 2).sum())
    assert err2 == pytest.approx(float(((projected - w) ** 2).sum()), rel=1e-10, abs=1e-20)
    tail0, tail1 = float((s0[r_out:] ** 2).sum()), float((s1[r_in:] ** 2).sum())
    # any Tucker-2 fit errs at least by each unfolding's tail; HOSVD at most by their sum
    assert max(tail0, tail1) - 1e-12 <= err2 <= tail0 + tail1 + 1e-12


@pytest.mark.parametrize("kind", ["linear", *CONV_LAYERS])
def test_full_rank_reproduces_dense(kind):
    torch.manual_seed(9)
    if kind == "linear":
        dense = nn.Linear(9, 6, dtype=F64)
        layer, x = LowRankLinear.from_linear(dense, 6), torch.randn(4, 9, dtype=F64)
    else:
        dense = nn.Conv2d(4, 5, (3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2), dtype=F64)
        x = torch.randn(2, 4, 9, 8, dtype=F64)
        layer = {
            "separable": lambda: SeparableConv2d.from_conv(dense, min(4 * 3, 5 * 2)),
            "cp": lambda: CPConv2d.from_conv(dense, cp_max_rank(5, 4, 3, 2)),
            "tucker": lambda: TuckerConv2d.from_conv(dense, (4, 5)),
        }[kind]()
    torch.testing.assert_close(layer.dense_weight(), dense.weight)
    torch.testing.assert_close(layer(x), dense(x))


@pytest.mark.parametrize("kind", CONV_LAYERS)
@pytest.mark.parametrize("bias", [True, False])
def test_from_conv_keeps_geometry_dtype_bias(kind, bias):
    conv = nn.Conv2d(
        4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=bias, dtype=F64
    )
    rank = (2, 3) if kind == "tucker" else 3
    layer = {"separable": SeparableConv2d, "cp": CPConv2d, "tucker": TuckerConv2d}[kind].from_conv(
        conv, rank
    )
    assert (layer.stride, layer.padding, layer.dilation) == ((2, 1), (1, 2), (1, 2))
    assert all(p.dtype == F64 and p.device == conv.weight.device for p in layer.parameters())
    assert (layer.bias is None) == (not bias)
    if bias:
        assert torch.equal(layer.bias, conv.bias) and layer.bias is not conv.bias
    same = nn.Conv2d(4, 6, 3, padding="same", dilation=2, dtype=F64)
    x = torch.randn(1, 4, 8, 8, dtype=F64)
    full = (
        (4, 6)
        if kind == "tucker"
        else min(12, 18)
        if kind == "separable"
        else cp_max_rank(6, 4, 3, 3)
    )
    layer = type(layer).from_conv(same, full)
    assert layer.padding == same.padding == "same"  # kept as given, as nn.Conv2d keeps it
    torch.testing.assert_close(layer(x), same(x))


@pytest.mark.parametrize("cls", [SeparableConv2d, CPConv2d, TuckerConv2d])
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, groups=2, dtype=F64),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", dtype=F64),
        nn.Conv2d(4, 6, 2, padding="same", dtype=F64),
    ],
    ids=["groups", "reflect", "asymmetric-same"],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's reference
def test_from_conv_takes_what_was_refused_before(cls, conv):
    """Grouped convs, padding modes and asymmetric 'same' were refused before the rewrite; now
    they are fitted, and at max_rank exactly."""
    top = cls.max_rank(conv.in_channels, conv.out_channels, conv.kernel_size, conv.groups)
    layer = cls.from_conv(conv, (top.input_rank, top.output_rank) if cls is TuckerConv2d else top)
    x = torch.randn(2, 4, 6, 7, dtype=F64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [SeparableConv2d, CPConv2d, TuckerConv2d, LowRankLinear])
def test_from_dense_refuses_the_wrong_source_type(cls):
    fit = cls.from_linear if cls is LowRankLinear else cls.from_conv
    wrong = nn.Conv1d(4, 6, 3) if cls is not LowRankLinear else nn.Conv2d(4, 6, 1)
    with pytest.raises(FactorizationError, match=rf"{cls.__name__}.*expected an nn\.") as info:
        fit(wrong, (1, 1) if cls is TuckerConv2d else 1)
    assert "\n" not in str(info.value)


# --- initialisation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,fan_in",
    [
        (lambda: LowRankLinear(1024, 512, 64), 1024),
        (lambda: SeparableConv2d(64, 96, 3, 48), 64 * 9),
        (lambda: CPConv2d(64, 96, 3, 128), 64 * 9),
        (lambda: TuckerConv2d(64, 96, 3, (32, 48)), 64 * 9),
        (lambda: CPConv2d(64, 96, 3, 32, groups=4), 16 * 9),  # fan_in is per group
        (lambda: TuckerConv2d(64, 96, 3, (8, 12), groups=4), 16 * 9),
    ],
)
def test_init_variance_matches_pytorch_default(build, fan_in):
    torch.manual_seed(10)
    layer = build()
    variances = []
    for _ in range(8):
        layer.reset_parameters()
        variances.append(float(layer.dense_weight().detach().pow(2).mean()))
    assert sum(variances) / len(variances) == pytest.approx(1 / (3 * fan_in), rel=0.15)
    bound = 1 / math.sqrt(fan_in)
    assert layer.bias.abs().max() <= bound and layer.bias.std() > 0.4 * bound


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", *CONV_LAYERS])
def test_gradcheck(kind):
    torch.manual_seed(11)
    if kind == "linear":
        layer, x = LowRankLinear(5, 4, 2, dtype=F64), torch.randn(3, 5, dtype=F64)
    else:
        layer = make_conv(
            kind, 3, 4, (3, 2), 2, stride=(2, 1), padding=1, dilation=(1, 2), dtype=F64
        )
        x = torch.randn(2, 3, 6, 5, dtype=F64)
    names = [n for n, _ in layer.named_parameters()]

    def fn(inp, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (inp,))

    inputs = (
        x.requires_grad_(),
        *(p.detach().clone().requires_grad_() for p in layer.parameters()),
    )
    assert torch.autograd.gradcheck(fn, inputs)


# --- cost -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 12), (12,)])
def test_lowrank_linear_macs(bias, shape):
    layer = LowRankLinear(12, 9, 4, bias=bias)
    assert layer.analytic_macs(shape) == count_macs(layer, torch.randn(shape))


@pytest.mark.parametrize("kind", CONV_LAYERS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("shape", [(2, 5, 11, 10), (5, 9, 13)])
def test_conv_macs(kind, geometry, shape):
    kernel, stride, padding, dilation = geometry
    layer = make_conv(kind, 5, 6, kernel, 3, stride=stride, padding=padding, dilation=dilation)
    assert layer.analytic_macs(shape) == count_macs(layer, torch.randn(shape))


def test_macs_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"\(\*, 12\)"):
        LowRankLinear(12, 9, 4).analytic_macs((3, 11))
    with pytest.raises(ValueError, match=r"\(N, 5, H, W\)"):
        SeparableConv2d(5, 6, 3, 2).analytic_macs((2, 4, 8, 8))


# --- argument errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,parts",
    [
        (lambda: LowRankLinear(12, 9, 0), ["in_features=12, out_features=9", "rank=0", "1..9"]),
        (lambda: LowRankLinear(12, 9, 10),
         ["rank=10 is out of range; nearest that works: rank=9; valid ranks are 1..9"]),
        (lambda: SeparableConv2d(4, 5, (3, 2), 13), ["kernel_size=(3, 2)", "rank=13", "1..10"]),
        (lambda: CPConv2d(4, 5, 3, 37), ["in_channels=4, out_channels=5", "rank=37", "1..36"]),
        (lambda: CPConv2d(4, 5, 3, 0), ["rank=0", "1..36"]),
        (lambda: TuckerConv2d(4, 5, 3, (5, 2)), ["input_rank=5", "1..4"]),
        (lambda: TuckerConv2d(4, 5, 3, (2, 6)), ["output_rank=6", "1..5"]),
        (lambda: TuckerConv2d(4, 5, 3, 2), ["ranks must be (input_rank, output_rank)"]),
    ],
)
def test_bad_rank_message(build, parts):
    with pytest.raises(ValueError) as info:
        build()
    text = str(info.value)
    assert "\n" not in text and all(part in text for part in parts), text


def test_extra_repr():
    assert "rank=3" in repr(SeparableConv2d(4, 5, 3, 3, padding=1))
    assert "ranks=(2, 3)" in repr(TuckerConv2d(4, 5, 3, (2, 3)))
    assert "in_features=6, out_features=4, rank=2" in repr(LowRankLinear(6, 4, 2))


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kind", ["linear", *CONV_LAYERS])
def test_cuda_forward_and_fit(kind):
    torch.manual_seed(12)
    if kind == "linear":
        dense = nn.Linear(32, 16, device="cuda")
        layer = LowRankLinear.from_linear(dense, 8)
        x = torch.randn(4, 32, device="cuda")
        expected = F.linear(x, layer.dense_weight(), layer.bias)
    else:
        dense = nn.Conv2d(8, 12, 3, stride=2, padding=1, device="cuda")
        ranks = (4, 6) if kind == "tucker" else 4
        cls = {"separable": SeparableConv2d, "cp": CPConv2d, "tucker": TuckerConv2d}[kind]
        layer = cls.from_conv(dense, ranks)
        x = torch.randn(2, 8, 16, 16, device="cuda")
        expected = dense_conv(layer, x)
    assert all(p.is_cuda for p in layer.parameters())
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


# --- every mode, like nn.Linear / nn.Conv2d ------------------------------------------------------

KINDS = ["linear", *CONV_LAYERS]


def small_layer(kind: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A small layer of ``kind`` and an input for it (seeded)."""
    torch.manual_seed(13)
    if kind == "linear":
        layer = LowRankLinear(12, 8, 3, dtype=dtype, device=device)
        return layer, torch.randn(5, 12, dtype=dtype, device=device)
    layer = make_conv(kind, 4, 6, 3, 3, stride=(1, 2), padding=1, dtype=dtype, device=device)
    return layer, torch.randn(2, 4, 7, 8, dtype=dtype, device=device)


def grads(layer: nn.Module, x: torch.Tensor, run=None, seed: int = 14) -> dict[str, torch.Tensor]:
    """Output of ``run`` (default ``layer``) and the gradients of ``<out, g>`` wrt the input and
    every trainable parameter of ``layer``."""
    x = x.detach().clone().requires_grad_()
    out = (layer if run is None else run)(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    names = ["input", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    wrt = [x, *(p for p in layer.parameters() if p.requires_grad)]
    return {"out": out.detach(), **dict(zip(names, torch.autograd.grad((out * g).sum(), wrt)))}


def assert_same(got: dict, want: dict, **tolerance) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key, **tolerance)


def bf16_close(approx: torch.Tensor, exact: torch.Tensor, stages: int) -> None:
    """Within bfloat16 precision: each stage rounds its inputs (relative error 2**-8 each)."""
    assert rel_err(approx.float(), exact.float()) < 2 * (stages + 1) * 2.0**-8


STAGES = {"linear": 2, "separable": 2, "cp": 4, "tucker": 3}


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_autocast_bf16_like_torch_layers(kind):
    layer, x = small_layer(kind)
    reference = grads(layer, x)
    torch_layer = nn.Linear(3, 3) if kind == "linear" else nn.Conv2d(3, 3, 1)
    torch_x = torch.randn(2, 3) if kind == "linear" else torch.randn(1, 3, 2, 2)
    with torch.autocast("cpu", torch.bfloat16):
        out = layer(x)
        assert out.dtype == torch_layer(torch_x).dtype == torch.bfloat16
        got = grads(layer, x)
    bf16_close(out, reference["out"], STAGES[kind])
    for name, p in layer.named_parameters():  # master weights stay float32, as in torch
        assert got[name].dtype == p.dtype == torch.float32
        bf16_close(got[name], reference[name], STAGES[kind] + 1)
    assert got["input"].dtype == torch.float32


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_autocast_like_torch_layers(kind, dtype):
    layer, x = small_layer(kind, device="cuda")
    reference = layer(x)
    with torch.autocast("cuda", dtype):
        out = layer(x)
    assert out.dtype == dtype
    if dtype == torch.bfloat16:
        bf16_close(out, reference, STAGES[kind])
    else:
        assert rel_err(out.float(), reference) < 2 * (STAGES[kind] + 1) * 2.0**-11


@pytest.mark.parametrize("kind", KINDS)
def test_inference_mode_then_training(kind):
    layer, x = small_layer(kind)
    fresh = grads(layer, x)
    with torch.inference_mode():
        out = layer(x)
    torch.testing.assert_close(out, fresh["out"], rtol=0, atol=0)
    layer.train()
    assert_same(grads(layer, x), fresh, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_parameters(kind):
    layer, x = small_layer(kind, dtype=F64)
    trainable = grads(layer, x)
    first, *rest = [n for n, _ in layer.named_parameters()]
    layer.get_parameter(first).requires_grad_(False)  # e.g. fine-tuning all but one factor
    partial = grads(layer, x)
    assert first not in partial
    assert_same(partial, {k: v for k, v in trainable.items() if k != first})
    layer.requires_grad_(False)  # fully frozen: still differentiable wrt its input
    frozen = grads(layer, x)
    assert frozen.keys() == {"out", "input"}
    torch.testing.assert_close(frozen["input"], trainable["input"])
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_equals_eager(kind):
    """Dynamo captures the whole layer (fullgraph: no graph break) and AOTAutograd's forward and
    backward agree with eager; the Inductor variant below runs in CI."""
    torch._dynamo.reset()
    layer, x = small_layer(kind, dtype=F64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_same(grads(layer, x, compiled), grads(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_compile_inductor_equals_eager(kind):
    torch._dynamo.reset()
    layer, x = small_layer(kind)
    compiled = torch.compile(layer, fullgraph=True)
    assert_same(grads(layer, x, compiled), grads(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", CONV_LAYERS)
def test_channels_last_model_and_gradients(kind):
    """``model.to(memory_format=torch.channels_last)`` works on a net holding the layer, with the
    same outputs and gradients as the contiguous net."""
    layer, x = small_layer(kind, dtype=F64)
    net = nn.Sequential(layer, nn.BatchNorm2d(6, dtype=F64), nn.ReLU())
    contiguous = grads(net, x)
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    got = grads(net_cl, x.to(memory_format=torch.channels_last))
    assert_same(got, contiguous)


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_is_independent(kind):
    layer, x = small_layer(kind)
    twin = copy.deepcopy(layer)
    assert repr(twin) == repr(layer)
    torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
    before = layer(x).detach()
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2.0)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    assert not torch.equal(twin(x), before)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    layer, x = small_layer(kind)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    twin, _ = small_layer(kind)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert twin.load_state_dict(state) is not None
    torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
    assert set(state) == EXPECTED_KEYS[kind]
    wrong_rank = LowRankLinear(12, 8, 2) if kind == "linear" else make_conv(kind, 4, 6, 3, 2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        wrong_rank.load_state_dict(state)


EXPECTED_KEYS = {
    "linear": {"weight_u", "weight_v", "bias"},
    "separable": {"weight_vertical", "weight_horizontal", "bias"},
    "cp": {"weight_in", "weight_vertical", "weight_horizontal", "weight_out", "bias"},
    "tucker": {"weight_in", "weight_core", "weight_out", "bias"},
}


# --- checkpoints from before the rewrite, groups, refusals ---------------------------------------

V1 = Path(__file__).parent / "data" / "lowrank_v1.pt"
V1_CLASSES = {"linear": LowRankLinear, "separable": SeparableConv2d, "cp": CPConv2d,
              "tucker": TuckerConv2d}


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_saved_before_the_rewrite_loads_unchanged(kind):
    """tests/data/lowrank_v1.pt was written by tests/data/make_lowrank_v1.py with the layers as
    they were before the shared base (commit e907d80): same keys, shapes and outputs."""
    saved = torch.load(V1, weights_only=True)[kind]
    layer = V1_CLASSES[kind](**saved["kwargs"], dtype=F64)
    layer.load_state_dict(saved["state_dict"])  # strict: no key missing or unexpected
    # and the same parameter order: an optimizer's saved state is indexed by it
    assert list(saved["state_dict"]) == [name for name, _ in layer.named_parameters()]
    with torch.no_grad():
        torch.testing.assert_close(layer(saved["input"]), saved["output"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [SeparableConv2d, CPConv2d, TuckerConv2d])
@pytest.mark.parametrize("groups,c,f", [(2, 4, 6), (3, 3, 6)])
def test_grouped_fit_is_each_group_fitted_alone(cls, groups, c, f):
    """A grouped conv is ``groups`` independent convs: its fit equals fitting each group's
    ``(F/g, C/g, kh, kw)`` kernel as an ungrouped conv, below full rank too."""
    torch.manual_seed(16)
    conv = nn.Conv2d(c, f, (3, 2), groups=groups, dtype=F64)
    rank = (1, 2) if cls is TuckerConv2d else 2
    sweeps = {"n_iter_max": 30} if cls is CPConv2d else {}  # ALS is deterministic: any count
    whole = cls.from_conv(conv, rank, **sweeps).dense_weight().detach()
    for g, block in enumerate(conv.weight.detach().chunk(groups)):
        alone = nn.Conv2d(c // groups, f // groups, (3, 2), dtype=F64)
        with torch.no_grad():
            alone.weight.copy_(block)
        expected = cls.from_conv(alone, rank, **sweeps).dense_weight().detach()
        torch.testing.assert_close(whole.chunk(groups)[g], expected, rtol=1e-10, atol=1e-12)


def test_grouped_separable_fit_is_optimal_per_group():
    torch.manual_seed(17)
    conv = nn.Conv2d(4, 6, (3, 2), groups=2, dtype=F64)
    layer = SeparableConv2d.from_conv(conv, 2)
    w = conv.weight.detach().reshape(2, 3, 2, 3, 2)  # (g, f, c, i, j)
    s = torch.linalg.svdvals(w.permute(0, 2, 3, 1, 4).reshape(2, 2 * 3, 3 * 2))
    err = float(((layer.dense_weight() - conv.weight).detach() ** 2).sum())
    assert err == pytest.approx(float((s[:, 2:] ** 2).sum()), rel=1e-10)


@pytest.mark.parametrize(
    "got,want",
    [
        (lambda: LowRankLinear.max_rank(7, 5), 5),
        (lambda: SeparableConv2d.max_rank(4, 6, (3, 2)), min(4 * 3, 6 * 2)),
        (lambda: SeparableConv2d.max_rank(4, 6, (3, 2), groups=2), min(2 * 3, 3 * 2)),
        (lambda: CPConv2d.max_rank(6, 4, 3), 4 * 6 * 3 * 3 // 6),
        (lambda: CPConv2d.max_rank(8, 16, (3, 1), groups=8), 2 * 1 * 3 * 1 // 3),
        (lambda: TuckerConv2d.max_rank(4, 6, 3), (4, 6)),  # (input_rank, output_rank)
        (lambda: TuckerConv2d.max_rank(4, 6, 3, groups=2).input_rank, 2),
    ],
)
def test_max_rank(got, want):
    assert got() == want


@pytest.mark.parametrize("kind", KINDS)
def test_max_rank_is_the_constructors_bound(kind):
    """``max_rank`` builds; one more is refused (per group, depthwise included)."""
    if kind == "linear":
        top = LowRankLinear.max_rank(6, 4)
        LowRankLinear(6, 4, top)
        with pytest.raises(FactorizationError):
            LowRankLinear(6, 4, top + 1)
        return
    cls = V1_CLASSES[kind]
    for c, f, groups in [(4, 6, 1), (4, 6, 2), (4, 8, 4)]:
        top = cls.max_rank(c, f, (3, 2), groups)
        if cls is TuckerConv2d:
            cls(c, f, (3, 2), (top.input_rank, top.output_rank), groups=groups)
            for bad in [(top.input_rank + 1, 1), (1, top.output_rank + 1)]:
                with pytest.raises(FactorizationError):
                    cls(c, f, (3, 2), bad, groups=groups)
        else:
            cls(c, f, (3, 2), top, groups=groups)
            with pytest.raises(FactorizationError):
                cls(c, f, (3, 2), top + 1, groups=groups)


@pytest.mark.parametrize(
    "build,parts",
    [
        (lambda: SeparableConv2d(4, 6, 3, 10, groups=2),
         ["SeparableConv2d(", "groups=2", "rank=10 is out of range",
          "valid ranks per group (groups=2) are 1..6", "nearest that works: rank=6"]),
        (lambda: CPConv2d(4, 4, 3, 100, groups=4),
         ["groups=4", "valid ranks per group (groups=4) are 1..3", "nearest that works: rank=3"]),
        (lambda: TuckerConv2d(4, 6, 3, (3, 1), groups=2),
         ["input_rank=3", "input_ranks per group (groups=2) are 1..2",
          "nearest that works: input_rank=2"]),
        (lambda: LowRankLinear(12, 9, 0), ["nearest that works: rank=1"]),
    ],
)
def test_rank_refusal_names_groups_and_the_nearest_rank(build, parts):
    with pytest.raises(FactorizationError) as info:
        build()
    text = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in text
    assert all(part in text for part in parts), text


def nn_style_layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A grouped layer with reflect padding of an even kernel ('same': asymmetric) and an
    unbatched input: the arguments that were refused before the rewrite."""
    torch.manual_seed(18)
    if kind == "linear":
        return LowRankLinear(6, 4, 2, dtype=F64), torch.randn(6, dtype=F64)
    cls = V1_CLASSES[kind]
    rank = {"ranks": (1, 2)} if cls is TuckerConv2d else {"rank": 2}
    layer = cls(4, 6, (2, 3), **rank, padding="same", groups=2, padding_mode="reflect",
                dtype=F64)
    return layer, torch.randn(4, 7, 8, dtype=F64)


@pytest.mark.parametrize("kind", KINDS)
def test_export_equals_eager_with_groups_and_padding_modes(kind):
    layer, x = nn_style_layer(kind)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_with_groups_and_padding_modes(kind):
    torch._dynamo.reset()
    layer, x = nn_style_layer(kind)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_same(grads(layer, x, compiled), grads(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_modes_with_groups_and_padding_modes(kind):
    """inference_mode, channels_last and CPU autocast on the layers' new arguments (the pad
    between stages must keep the memory format and the autocast dtype)."""
    layer, x = nn_style_layer(kind)
    eager = grads(layer, x)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), eager["out"], rtol=0, atol=0)
    if kind != "linear":
        batch = x[None].to(memory_format=torch.channels_last)
        twin = copy.deepcopy(layer).to(memory_format=torch.channels_last)
        torch.testing.assert_close(twin(batch)[0], eager["out"], rtol=1e-12, atol=1e-12)
    layer, x = layer.float(), x.float()
    with torch.autocast("cpu", torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    bf16_close(out, eager["out"].float(), STAGES[kind])


def test_tucker_max_rank_builds_the_full_rank_layer():
    # max_rank comes in the constructor's order, (input_rank, output_rank), so it feeds
    # TuckerConv2d directly; C != F makes a swapped order fail
    top = TuckerConv2d.max_rank(4, 6, 3)
    conv = torch.nn.Conv2d(4, 6, 3, dtype=torch.float64)
    layer = TuckerConv2d.from_conv(conv, top)
    torch.testing.assert_close(layer.dense_weight(), conv.weight, rtol=1e-10, atol=1e-10)
