"""KronLinear / KronConv2d: exactness against the dense reference, degenerate cases, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kron.layers import KronConv2d, KronLinear

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
IMPLS = ["factored", "composed", "auto"]


def kron_reference(layer) -> torch.Tensor:
    """Sum of torch.kron over every term, the definition itself (independent of the layer's
    own composition, so that every implementation is checked against it)."""
    return sum(
        torch.kron(a[r], b[r])
        for a, b in layer.factor_pairs()
        for r in range(a.shape[0])
    )


LINEAR_CASES = [
    (12, 6, [(2, 3)]),
    (12, 6, [(2, 3), (2, 3), (2, 3)]),  # Kronecker rank 3
    (12, 6, [(2, 3), (3, 2), (6, 1), (2, 3)]),  # mixed shapes
    (16, 8, [(8, 1)]),  # A (m x 1) (x) B (1 x n): rank-1 low rank
    (16, 8, [(8, 16)]),  # B is 1 x 1: a plain dense layer
    (64, 32, [(4, 8), (8, 4), (4, 8)]),  # A-first and B-first orders
    (30, 20, [(2, 15), (10, 3)]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_in,n_out,terms", LINEAR_CASES)
def test_linear_matches_dense(n_in, n_out, terms, impl, bias, dtype):
    torch.manual_seed(0)
    layer = KronLinear(n_in, n_out, terms, bias=bias, implementation=impl, dtype=dtype)
    w = kron_reference(layer)
    torch.testing.assert_close(layer.dense_weight(), w, **TOL[dtype])
    x = torch.randn(3, 5, n_in, dtype=dtype)  # extra leading dims, like nn.Linear
    y = layer(x)
    assert y.shape == (3, 5, n_out) and y.dtype == dtype
    torch.testing.assert_close(y, F.linear(x, w, layer.bias), **TOL[dtype])


CONV_CASES = [
    # in, out, kernel, terms, stride, padding, dilation
    (8, 6, 3, [(2, 4, 1, 1)], 1, 1, 1),  # A 1x1: spatial kernel in B
    (8, 6, 3, [(2, 4, 1, 1), (2, 4, 1, 1)], 2, 1, 1),  # rank 2, strided
    (8, 6, 4, [(2, 2, 2, 2)], 1, 1, 1),  # 4x4 kernel split 2x2 (x) 2x2
    (8, 6, 4, [(2, 2, 2, 2), (3, 4, 1, 2)], 2, (2, 1), (1, 2)),  # mixed, split, dilated
    (8, 6, (4, 3), [(2, 2, 2, 1), (3, 4, 1, 3), (3, 4, 1, 3)], 2, (1, 2), (1, 2)),
    (8, 6, 3, [(6, 8, 3, 1)], 1, 1, 1),  # B (1,1,1,3): separable k x 1 then 1 x k
    (8, 6, 3, [(6, 8, 3, 3)], (1, 2), 0, 2),  # B is 1x1x1x1: a plain dense conv
    (4, 4, 1, [(2, 2, 1, 1)], 1, 0, 1),  # pointwise conv
    (8, 6, (2, 6), [(3, 2, 2, 3)], (2, 3), (1, 0), 1),  # non-square, A carries space
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: str(c[3]))
def test_conv_matches_dense(case, impl, bias, dtype):
    c_in, c_out, k, terms, stride, padding, dilation = case
    torch.manual_seed(0)
    layer = KronConv2d(c_in, c_out, k, terms, stride=stride, padding=padding, dilation=dilation,
                       bias=bias, implementation=impl, dtype=dtype)
    w = kron_reference(layer)
    torch.testing.assert_close(layer.dense_weight(), w, **TOL[dtype])
    x = torch.randn(2, c_in, 11, 13, dtype=dtype)
    ref = F.conv2d(x, w, layer.bias, stride, padding, dilation)
    torch.testing.assert_close(layer(x), ref, **TOL[dtype])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y_cl = layer(x_cl)
    torch.testing.assert_close(y_cl, ref, **TOL[dtype])
    assert y_cl.is_contiguous(memory_format=torch.channels_last) or y_cl.shape[-2:] == (1, 1)


def test_conv_matches_nn_conv2d_module():
    """Same numbers as an nn.Conv2d holding the composed kernel (string padding too)."""
    torch.manual_seed(1)
    layer = KronConv2d(6, 4, 3, [(2, 3, 1, 1), (4, 2, 3, 1)], padding="same", dtype=torch.float64)
    conv = nn.Conv2d(6, 4, 3, padding="same", dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(kron_reference(layer))
        conv.bias.copy_(layer.bias)
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x))


def test_rank_one_low_rank_case():
    """A (m x 1) (x) B (1 x n) is the outer product of A's column and B's row: W has rank 1."""
    layer = KronLinear(10, 7, [(7, 1)], dtype=torch.float64)
    a, b = layer.a_factors[0][0], layer.b_factors[0][0]
    torch.testing.assert_close(layer.dense_weight(), a[:, :1] @ b[:1, :])
    assert torch.linalg.matrix_rank(layer.dense_weight()) == 1


def test_plain_dense_case_reproduces_linear_exactly():
    """A (m x n), B (1 x 1): from_linear recovers any dense layer exactly."""
    torch.manual_seed(0)
    linear = nn.Linear(9, 5, dtype=torch.float64)
    layer = KronLinear.from_linear(linear, [(5, 9)], implementation="factored")
    x = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x))
    torch.testing.assert_close(layer.dense_weight(), linear.weight)


def test_separable_conv_case():
    """A (F, C, k, 1) (x) B (1, 1, 1, k): every filter slice is a rank-1 k x k matrix, i.e. the
    k x 1 / 1 x k separable scheme."""
    layer = KronConv2d(5, 4, 3, [(4, 5, 3, 1)], dtype=torch.float64)
    w = layer.dense_weight()
    ranks = torch.linalg.matrix_rank(w.reshape(-1, 3, 3))
    assert ranks.max().item() == 1
    a, b = layer.factor_pairs()[0]
    col = a[0, :, :, :, 0]  # (F, C, k)
    row = b[0, 0, 0, 0]  # (k,)
    torch.testing.assert_close(w, col[..., :, None] * row[None, None, None, :])


def test_gradcheck_linear():
    torch.manual_seed(0)
    layer = KronLinear(6, 4, [(2, 3), (2, 3), (4, 1)], implementation="factored",
                       dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(dict(layer.named_parameters()), ps)),
                                          (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("terms", [[(2, 2, 1, 1), (2, 2, 1, 1)], [(2, 1, 2, 1), (1, 2, 1, 2)]])
def test_gradcheck_conv(terms):
    torch.manual_seed(0)
    layer = KronConv2d(4, 4, 2, terms, stride=1, padding=1, implementation="factored",
                       dtype=torch.float64)
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))


def test_factored_and_dense_gradients_agree():
    torch.manual_seed(0)
    fact = KronConv2d(8, 6, 3, [(2, 4, 1, 1), (3, 2, 3, 1)], padding=1,
                      implementation="factored", dtype=torch.float64)
    dense = KronConv2d(8, 6, 3, [(2, 4, 1, 1), (3, 2, 3, 1)], padding=1,
                       implementation="composed", dtype=torch.float64)
    dense.load_state_dict(fact.state_dict())
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    for layer in (fact, dense):
        layer(x).square().sum().backward()
    for p, q in zip(fact.parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_init_variance_matches_pytorch_default():
    """The composed weight's variance is nn.Linear's default, 1 / (3 fan_in), for mixed terms.

    One draw of a Kronecker product has few independent entries, so its sample variance is
    noisy: average over re-initialisations (the expectation is what the init controls)."""
    torch.manual_seed(0)
    layer = KronLinear(1024, 512, [(16, 32), (16, 32), (32, 16), (8, 8)])
    conv = KronConv2d(64, 64, 3, [(8, 8, 1, 1), (8, 8, 1, 1), (4, 4, 3, 1)])
    for module, fan_in in ((layer, 1024), (conv, 64 * 9)):
        draws = []
        for _ in range(40):
            module.reset_parameters()
            draws.append(module.dense_weight().pow(2).mean().item())
        assert abs(sum(draws) / len(draws) * 3 * fan_in - 1) < 0.1


def test_dense_weight_cache_follows_parameter_updates():
    torch.manual_seed(0)
    layer = KronLinear(8, 4, [(2, 2)], implementation="composed")
    x = torch.randn(3, 8)
    with torch.no_grad():
        y0 = layer(x)
        layer.a_factors[0].mul_(2.0)
        y1 = layer(x)
    torch.testing.assert_close(y1 - layer.bias, 2 * (y0 - layer.bias))


def test_state_dict_round_trip():
    layer = KronConv2d(8, 6, 3, [(2, 4, 1, 1), (3, 2, 3, 1)], padding=1)
    other = KronConv2d(8, 6, 3, [(2, 4, 1, 1), (3, 2, 3, 1)], padding=1)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other.dense_weight(), layer.dense_weight())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: KronLinear(12, 6, [(4, 3)]), "nearest valid"),
        (lambda: KronLinear(12, 6, [(2, 3, 1)]), "2 axes"),
        (lambda: KronLinear(12, 6, []), "non-empty"),
        (lambda: KronConv2d(8, 6, 3, [(2, 3, 1, 1)]), "KronConv2d(6, 8, 3, 3)"),
        (lambda: KronConv2d(8, 6, 3, [(2, 4, 2, 1)]), "nearest valid"),
        (lambda: KronLinear(12, 6, [(2, 3)], implementation="fast"), "use one of"),
        (lambda: KronConv2d(8, 8, 3, [(4, 4, 1, 1)], groups=4), "KronConv2d(2, 2, 3, 3)"),
        (lambda: KronConv2d(8, 6, 3, [(2, 4, 1, 1)], groups=4), "groups=4 must divide"),
    ],
)
def test_bad_terms_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=None) as info:
        make()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_wrong_input_shape_is_a_clear_error():
    layer = KronLinear(12, 6, [(2, 3)], implementation="factored")
    with pytest.raises(ValueError, match="last dimension 12"):
        layer(torch.randn(2, 10))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_dense(dtype):
    torch.manual_seed(0)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    conv = KronConv2d(16, 16, 4, [(4, 4, 2, 2), (2, 8, 1, 1)], stride=2, padding=1,
                      implementation="factored", device="cuda", dtype=dtype)
    x = torch.randn(4, 16, 12, 12, device="cuda", dtype=dtype)
    ref = F.conv2d(x.double(), conv.dense_weight().double(), conv.bias.double(), 2, 1)
    torch.testing.assert_close(conv(x).double(), ref, **tol)
    lin = KronLinear(64, 32, [(4, 8), (8, 4)], implementation="factored", device="cuda",
                     dtype=dtype)
    x = torch.randn(8, 64, device="cuda", dtype=dtype)
    ref = F.linear(x.double(), lin.dense_weight().double(), lin.bias.double())
    torch.testing.assert_close(lin(x).double(), ref, **tol)


def test_parameter_count_is_sum_of_factor_sizes():
    layer = KronLinear(64, 32, [(4, 8), (4, 8), (8, 4)])
    expected = 2 * (4 * 8 + 8 * 8) + (8 * 4 + 4 * 16) + 32
    assert sum(p.numel() for p in layer.parameters()) == expected
    conv = KronConv2d(16, 8, 3, [(4, 4, 1, 1)], bias=False)
    assert sum(p.numel() for p in conv.parameters()) == 16 + 2 * 4 * 9
    assert math.prod(conv.dense_weight().shape) == 8 * 16 * 9


@pytest.mark.parametrize("chunk_floats", [1, 700, 1 << 18])
def test_inference_chunks_match_dense(chunk_floats):
    """The no-grad CPU path runs in cache-sized chunks of rows (with a remainder chunk) and
    conv inference writes into the layer's workspace; both must give the dense reference's
    numbers for every layer kind."""
    torch.manual_seed(0)
    x = torch.randn(7, 64, dtype=torch.float64)
    for terms in ([(4, 8)] * 3, [(4, 8), (8, 2), (16, 64)]):
        lin = KronLinear(64, 32, terms, implementation="factored", dtype=torch.float64)
        lin.inference_chunk_floats = chunk_floats
        with torch.no_grad():
            torch.testing.assert_close(lin(x), F.linear(x, lin.dense_weight(), lin.bias))
    for c_in, c_out, k, terms, stride, padding, dilation in CONV_CASES:
        conv = KronConv2d(c_in, c_out, k, terms, stride=stride, padding=padding,
                          dilation=dilation, implementation="factored", dtype=torch.float64)
        x = torch.randn(5, c_in, 11, 13, dtype=torch.float64)
        ref = F.conv2d(x, conv.dense_weight(), conv.bias, stride, padding, dilation)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), ref)
            torch.testing.assert_close(conv(x.contiguous(memory_format=torch.channels_last)),
                                       ref)


def test_from_dense_keeps_a_missing_bias_missing_and_names_a_wrong_source():
    lin = nn.Linear(16, 8, bias=False)
    fitted = KronLinear.from_linear(lin, [(2, 4)])
    assert fitted.bias is None
    x = torch.randn(3, 16)
    torch.testing.assert_close(fitted(x), F.linear(x, fitted.dense_weight()))
    conv = nn.Conv2d(8, 8, 3, bias=False, padding=1)
    assert KronConv2d.from_conv(conv, [(2, 2, 1, 1)]).bias is None
    with pytest.raises(ValueError, match="expected an nn.Linear, got Conv2d"):
        KronLinear.from_linear(conv, [(2, 4)])


def test_from_linear_fits_in_the_sources_dtype():
    lin = nn.Linear(16, 8).double()
    fitted = KronLinear.from_linear(lin, [(2, 4)] * 8)  # rank 8 = full rank of R(W): exact
    assert all(p.dtype == torch.float64 for p in fitted.parameters())
    torch.testing.assert_close(fitted.dense_weight(), lin.weight, rtol=0, atol=1e-12)


def test_meta_construction_counts_parameters_without_memory():
    conv = KronConv2d(32, 64, 3, [(4, 4, 1, 1), (2, 2, 3, 3)], groups=4, device="meta")
    assert all(p.device.type == "meta" for p in conv.parameters())
    # per block (16, 8, 3, 3): (4*4 + 4*2*9) + (2*2*9 + 8*4*1); times 4 blocks; plus bias
    assert sum(p.numel() for p in conv.parameters()) == 4 * (16 + 72 + 36 + 32) + 64
    lin = KronLinear(64, 32, [(4, 8)], device="meta")
    assert sum(p.numel() for p in lin.parameters()) == 4 * 8 + 8 * 8 + 32


def test_budget_helpers_see_a_grouped_conv_as_its_blocks():
    from kron.layers import FactorizationError, choose_terms, factorizations, kron_term_shapes

    conv = nn.Conv2d(16, 32, 3, groups=4)  # blocks (8, 4, 3, 3)
    assert (8, 4, 3, 3) in kron_term_shapes(conv) and (16, 4, 3, 3) not in kron_term_shapes(conv)
    best = choose_terms(conv, param_ratio=0.5)
    layer = KronConv2d.from_conv(conv, best)
    fits = {f.a_shape: f for f in factorizations(conv, input_hw=(8, 8))}
    assert fits[best[0]].params == sum(p.numel() for n, p in layer.named_parameters()
                                       if n != "bias")
    assert fits[best[0]].macs == layer.analytic_macs((1, 16, 8, 8), implementation="factored")
    depthwise = nn.Conv2d(8, 8, 1, groups=8)
    with pytest.raises(FactorizationError, match="groups=8 leaves blocks of") as info:
        choose_terms(depthwise, param_ratio=0.5)
    assert "\n" not in str(info.value)
