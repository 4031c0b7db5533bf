"""Property-based tests (hypothesis): every factored layer equals its dense reference.

Random layer shapes, Kronecker terms drawn from the valid factorisations
(:func:`kron.layers.shapes.kron_term_shapes`, mixed shapes and ranks), strides, paddings and
dilations; in float64 the layer's forward and the gradients of a random projection of its output
(wrt the input and every parameter) must equal those of ``F.linear`` / ``F.conv2d`` run on
``dense_weight()`` with the *drawn* geometry. The gradients of the reference reach the factors
through ``dense_weight()`` (the chain rule through the composed weight), so the two graphs share
nothing but the parameters. ``dense_weight()`` itself is pinned independently: it is the impulse
response of the layer's forward, and a fit of a weight built with ``torch.kron`` returns it.

Examples are derandomized (a fixed sequence, no example database), so the suite is deterministic
and its size fixed; each test draws a few dozen small cases.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from kron.layers import KronConv2d, KronLinear
from kron.layers.cp import cp_max_rank
from kron.layers.lowrank import CPConv2d, LowRankLinear, SeparableConv2d, TuckerConv2d
from kron.layers.shapes import kron_term_shapes

F64 = torch.float64
DIMS = [1, 2, 3, 4, 6, 8]  # layer sizes with few and many divisors
CHANNELS = [1, 2, 3, 4, 6]
IMPLEMENTATIONS = ["factored", "composed", "auto"]
CONV_KINDS = ["kron", "separable", "cp", "tucker"]


def examples(n: int):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- strategies ---------------------------------------------------------------------------------


@st.composite
def kron_terms(draw, layer: nn.Module, max_terms: int = 4) -> list[tuple[int, ...]]:
    """1..max_terms A shapes valid for ``layer``: mixed shapes, repeats give Kronecker rank."""
    shapes = kron_term_shapes(layer)
    return draw(st.lists(st.sampled_from(shapes), min_size=1, max_size=max_terms))


@st.composite
def conv_geometry(draw, stride_max: int = 2, allow_same: bool = True) -> dict:
    """Kernel, stride, padding (ints or 'same'/'valid'), dilation and an input size that gives
    at least one output pixel."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, stride_max)), draw(st.integers(1, stride_max)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    reach = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
    same_ok = allow_same and stride == (1, 1) and reach[0] % 2 == 0 and reach[1] % 2 == 0
    padding = draw(st.sampled_from(["ints", "valid", "same"] if same_ok else ["ints", "valid"]))
    if padding == "ints":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    pad = (0, 0) if padding == "valid" else (
        (reach[0] // 2, reach[1] // 2) if padding == "same" else padding)
    hw = tuple(max(1, r + 1 - 2 * p) + draw(st.integers(0, 4)) for r, p in zip(reach, pad))
    return dict(kernel_size=(kh, kw), stride=stride, padding=padding, dilation=dilation, hw=hw)


# --- the check ----------------------------------------------------------------------------------


def forward_and_grads(fn, x: torch.Tensor, params: list[torch.Tensor], g: torch.Tensor):
    """``fn(x)`` and the gradients of ``<fn(x), g>`` wrt ``x`` and ``params``."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    return out.detach(), torch.autograd.grad((out * g).sum(), [x, *params], allow_unused=True)


def assert_matches_reference(layer: nn.Module, x: torch.Tensor, reference, seed: int) -> None:
    """Forward, input and parameter gradients, and no-grad inference all equal the reference
    ``reference(x, dense_weight, bias)`` (float64)."""
    params = list(layer.parameters())
    with torch.no_grad():
        shape = reference(x, layer.dense_weight(), layer.bias).shape
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    got_out, got = forward_and_grads(layer, x, params, g)
    want_out, want = forward_and_grads(
        lambda inp: reference(inp, layer.dense_weight(), layer.bias), x, params, g)
    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_out, want_out, **tol)
    for name, a, b in zip(["input", *(n for n, _ in layer.named_parameters())], got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad of {name}: {m}", **tol)
    with torch.inference_mode():  # the no-autograd paths (chunked CPU inference, cached W)
        torch.testing.assert_close(layer(x), want_out, **tol)


@contextlib.contextmanager
def tiny_chunks(enabled: bool):
    """Shrink the CPU inference chunk budget so that tiny batches run in several chunks."""
    if enabled:
        with mock.patch.object(KronLinear, "inference_chunk_floats", 8):
            yield
    else:
        yield


def linear_ref(x, weight, bias):
    return F.linear(x, weight, bias)


def conv_ref(geometry: dict):
    keys = ("stride", "padding", "dilation")

    def ref(x, weight, bias):
        return F.conv2d(x, weight, bias, **{k: geometry[k] for k in keys})

    return ref


# --- Kronecker layers ---------------------------------------------------------------------------


@st.composite
def kron_linear_case(draw) -> dict:
    m, n = draw(st.sampled_from(DIMS)), draw(st.sampled_from(DIMS))
    return dict(m=m, n=n, terms=draw(kron_terms(nn.Linear(n, m, device="meta"))),
                lead=draw(st.lists(st.integers(1, 3), max_size=2)), bias=draw(st.booleans()),
                implementation=draw(st.sampled_from(IMPLEMENTATIONS)), chunked=draw(st.booleans()))


# Hand-picked cases that every run includes: both contraction orders, ranks > 1, several
# shape groups, chunked inference.
HARD_LINEAR = dict(m=6, n=8, terms=[(2, 4), (2, 4), (3, 2), (3, 2), (6, 1), (1, 8)], lead=[2, 3],
                   bias=True, implementation="factored", chunked=True)
HARD_CONVS = [
    dict(c=4, f=6, terms=[(2, 2, 1, 1), (2, 2, 1, 1), (3, 4, 3, 1), (1, 2, 3, 2), (1, 2, 3, 2)],
         geometry=dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1),
                       hw=(9, 6)), batch=3, bias=True, implementation=impl, chunked=True)
    for impl in ("factored", "composed")
] + [
    dict(c=6, f=4, terms=[(2, 3, 1, 1), (2, 3, 1, 1), (4, 2, 1, 1)],
         geometry=dict(kernel_size=(3, 3), stride=(1, 2), padding=(2, 1), dilation=(1, 2),
                       hw=(5, 7)), batch=2, bias=False, implementation="factored", chunked=True),
] + [  # 1x1 maps: a channels_last input is also contiguous, its strides fit both layouts
    dict(c=2, f=f, terms=[a], geometry=dict(kernel_size=a[2:], stride=(1, 1), padding=padding,
                                             dilation=(1, 1), hw=(1, 1)),
         batch=2, bias=False, implementation="factored", chunked=False)
    for f, a, padding in [(2, (1, 1, 1, 1), (0, 1)), (1, (1, 2, 2, 1), (1, 0))]
]


@examples(40)
@given(case=kron_linear_case())
@example(case=HARD_LINEAR)
def test_kron_linear_equals_dense(case):
    torch.manual_seed(len(case["terms"]) * 131 + case["m"] * 7 + case["n"])
    layer = KronLinear(case["n"], case["m"], case["terms"], bias=case["bias"],
                       implementation=case["implementation"], dtype=F64)
    x = torch.randn(*case["lead"], case["n"], dtype=F64)
    with tiny_chunks(case["chunked"]):
        assert_matches_reference(layer, x, linear_ref, seed=case["m"] + case["n"])


@st.composite
def kron_conv_case(draw) -> dict:
    c, f = draw(st.sampled_from(CHANNELS)), draw(st.sampled_from(CHANNELS))
    geometry = draw(conv_geometry())
    terms = draw(kron_terms(nn.Conv2d(c, f, geometry["kernel_size"], device="meta")))
    return dict(c=c, f=f, terms=terms, geometry=geometry, batch=draw(st.integers(1, 3)),
                bias=draw(st.booleans()), implementation=draw(st.sampled_from(IMPLEMENTATIONS)),
                chunked=draw(st.booleans()))


@examples(50)
@given(case=kron_conv_case())
@example(case=HARD_CONVS[0])
@example(case=HARD_CONVS[1])
@example(case=HARD_CONVS[2])
@example(case=HARD_CONVS[3])
@example(case=HARD_CONVS[4])
def test_kron_conv_equals_dense(case):
    c, f, geometry = case["c"], case["f"], case["geometry"]
    torch.manual_seed(len(case["terms"]) * 131 + c * 7 + f)
    layer = KronConv2d(c, f, geometry["kernel_size"], case["terms"], stride=geometry["stride"],
                       padding=geometry["padding"], dilation=geometry["dilation"],
                       bias=case["bias"], implementation=case["implementation"], dtype=F64)
    x = torch.randn(case["batch"], c, *geometry["hw"], dtype=F64)
    with tiny_chunks(case["chunked"]):
        assert_matches_reference(layer, x, conv_ref(geometry), seed=c + f)
    assert_channels_last_input_works(layer, x, conv_ref(geometry))


def assert_channels_last_input_works(layer: nn.Module, x: torch.Tensor, reference) -> None:
    """A channels_last input (also one whose strides fit both layouts, e.g. 1x1 maps) gives the
    reference output, in grad mode and in inference."""
    if x.dim() != 4:
        return
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = reference(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(layer(x_cl), want, rtol=1e-9, atol=1e-10)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x_cl), want, rtol=1e-9, atol=1e-10)


@st.composite
def kronecker_sum(draw, dims: tuple[int, ...]):
    """A random weight ``sum_r kron(A_r, B_r)`` of one term shape, built with ``torch.kron``."""
    a_shape = draw(st.sampled_from(kron_term_shapes(
        nn.Linear(dims[1], dims[0], device="meta") if len(dims) == 2
        else nn.Conv2d(dims[1], dims[0], dims[2:], device="meta"))))
    b_shape = tuple(d // a for d, a in zip(dims, a_shape))
    max_rank = min(torch.Size(a_shape).numel(), torch.Size(b_shape).numel())
    rank = draw(st.integers(1, min(max_rank, 3)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    weight = sum(torch.kron(torch.randn(a_shape, generator=gen, dtype=F64),
                            torch.randn(b_shape, generator=gen, dtype=F64)) for _ in range(rank))
    return [a_shape] * rank, weight


@examples(20)
@given(data=st.data(), conv=st.booleans())
def test_kron_fit_returns_a_torch_kron_sum(data, conv):
    """``torch.kron``'s index convention, end to end: a weight ``sum_r A_r (x) B_r`` (R up to
    the rearranged matrix's rank) is fitted exactly, and the layer computes with it."""
    if conv:
        c, f = data.draw(st.sampled_from(CHANNELS)), data.draw(st.sampled_from(CHANNELS))
        kh, kw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
        terms, weight = data.draw(kronecker_sum((f, c, kh, kw)))
        dense = nn.Conv2d(c, f, (kh, kw), padding=1, dtype=F64)
        layer_cls, fit, x = KronConv2d, KronConv2d.from_conv, torch.randn(2, c, 5, 4, dtype=F64)
    else:
        m, n = data.draw(st.sampled_from(DIMS)), data.draw(st.sampled_from(DIMS))
        terms, weight = data.draw(kronecker_sum((m, n)))
        dense = nn.Linear(n, m, dtype=F64)
        layer_cls, fit, x = KronLinear, KronLinear.from_linear, torch.randn(3, n, dtype=F64)
    with torch.no_grad():
        dense.weight.copy_(weight)
    layer = fit(dense, terms, implementation="factored")
    assert isinstance(layer, layer_cls)
    torch.testing.assert_close(layer.dense_weight(), weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-9, atol=1e-9)


@examples(15)
@given(data=st.data(), groups=st.sampled_from([2, 3]))
def test_kron_conv_fits_grouped_convolutions_exactly_at_full_rank(data, groups):
    """A grouped conv is ``groups`` independent block convs, each fitted on its own: with A
    ``(F/groups, 1, 1, 1)`` at full rank (``F/groups`` terms) the fit is exact."""
    fb = data.draw(st.integers(1, 3))
    conv = nn.Conv2d(groups * data.draw(st.integers(1, 3)), groups * fb, 3, groups=groups,
                     padding=1, padding_mode=data.draw(st.sampled_from(["zeros", "reflect"])),
                     dtype=F64)
    layer = KronConv2d.from_conv(conv, [(fb, 1, 1, 1)] * fb)
    assert (layer.groups, layer.padding_mode) == (conv.groups, conv.padding_mode)
    torch.testing.assert_close(layer.dense_weight(), conv.weight, rtol=1e-9, atol=1e-9)
    x = torch.randn(2, conv.in_channels, 5, 4, dtype=F64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-9, atol=1e-9)


# --- the low-rank baselines ---------------------------------------------------------------------


@examples(25)
@given(data=st.data(), m=st.integers(1, 9), n=st.integers(1, 9),
       lead=st.lists(st.integers(1, 3), max_size=2), bias=st.booleans())
def test_lowrank_linear_equals_dense(data, m, n, lead, bias):
    rank = data.draw(st.integers(1, min(m, n)))
    torch.manual_seed(rank * 97 + m * 7 + n)
    layer = LowRankLinear(n, m, rank, bias=bias, dtype=F64)
    assert_matches_reference(layer, torch.randn(*lead, n, dtype=F64), linear_ref, seed=m)


def build_lowrank_conv(kind: str, c: int, f: int, geometry: dict, rank, bias: bool):
    kwargs = {k: geometry[k] for k in ("kernel_size", "stride", "padding", "dilation")}
    cls = {"separable": SeparableConv2d, "cp": CPConv2d, "tucker": TuckerConv2d}[kind]
    rank_kw = {"ranks": rank} if kind == "tucker" else {"rank": rank}
    return cls(c, f, bias=bias, dtype=F64, **rank_kw, **kwargs)


@st.composite
def lowrank_rank(draw, kind: str, c: int, f: int, kernel_size: tuple[int, int]):
    kh, kw = kernel_size
    if kind == "separable":
        return draw(st.integers(1, min(c * kh, f * kw)))
    if kind == "cp":
        return draw(st.integers(1, min(cp_max_rank(f, c, kh, kw), 6)))
    return (draw(st.integers(1, c)), draw(st.integers(1, f)))


@st.composite
def lowrank_conv_case(draw, stride_max: int = 3) -> dict:
    kind = draw(st.sampled_from(CONV_KINDS[1:]))
    c, f = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    geometry = draw(conv_geometry(stride_max=stride_max))
    return dict(kind=kind, c=c, f=f, geometry=geometry,
                rank=draw(lowrank_rank(kind, c, f, geometry["kernel_size"])),
                batch=draw(st.integers(0, 2)), bias=draw(st.booleans()))


HARD_GEOMETRY = dict(kernel_size=(3, 2), stride=(2, 3), padding=(2, 1), dilation=(2, 2),
                     hw=(9, 8))


@examples(40)
@given(case=lowrank_conv_case())
@example(case=dict(kind="separable", c=3, f=4, geometry=HARD_GEOMETRY, rank=3, batch=2, bias=True))
@example(case=dict(kind="cp", c=3, f=4, geometry=HARD_GEOMETRY, rank=5, batch=2, bias=True))
@example(case=dict(kind="tucker", c=3, f=4, geometry=HARD_GEOMETRY, rank=(2, 3), batch=0,
                   bias=True))
def test_lowrank_conv_equals_dense(case):
    """``batch=0`` is an unbatched ``(C, H, W)`` input, which ``nn.Conv2d`` accepts too."""
    c, f, geometry = case["c"], case["f"], case["geometry"]
    torch.manual_seed(c * 7 + f)
    layer = build_lowrank_conv(case["kind"], c, f, geometry, case["rank"], case["bias"])
    hw = geometry["hw"]
    shape = (c, *hw) if case["batch"] == 0 else (case["batch"], c, *hw)
    x = torch.randn(shape, dtype=F64)
    assert_matches_reference(layer, x, conv_ref(geometry), seed=f)
    assert_channels_last_input_works(layer, x, conv_ref(geometry))


# --- dense_weight() is what the forward computes -------------------------------------------------


@examples(25)
@given(data=st.data(), kind=st.sampled_from(CONV_KINDS), c=st.sampled_from(CHANNELS),
       f=st.sampled_from(CHANNELS), kh=st.integers(1, 3), kw=st.integers(1, 3))
def test_dense_weight_is_the_impulse_response(data, kind, c, f, kh, kw):
    """A conv without bias, stride, padding or dilation maps the one-hot input ``e_(c, i, j)`` of
    kernel size to ``W[:, c, i, j]``: the kernel read off the forward, not off the factors."""
    geometry = dict(kernel_size=(kh, kw), stride=1, padding=0, dilation=1)
    torch.manual_seed(c * 7 + f)
    if kind == "kron":
        terms = data.draw(kron_terms(nn.Conv2d(c, f, (kh, kw), device="meta")))
        layer = KronConv2d(c, f, (kh, kw), terms, bias=False, implementation="factored",
                           dtype=F64)
    else:
        rank = data.draw(lowrank_rank(kind, c, f, (kh, kw)))
        layer = build_lowrank_conv(kind, c, f, geometry, rank, bias=False)
    eye = torch.eye(c * kh * kw, dtype=F64).reshape(-1, c, kh, kw)
    response = layer(eye).reshape(c, kh, kw, f).permute(3, 0, 1, 2)
    torch.testing.assert_close(layer.dense_weight(), response, rtol=1e-12, atol=1e-12)


# --- factor gradients by finite differences (tiny cases) -----------------------------------------


@examples(6)
@given(data=st.data(), conv=st.booleans())
def test_kron_factored_gradcheck(data, conv):
    """Gradients of the factored path against finite differences, input and every factor."""
    if conv:
        c, f = data.draw(st.sampled_from([2, 4])), data.draw(st.sampled_from([2, 4]))
        geometry = data.draw(conv_geometry())
        terms = data.draw(kron_terms(nn.Conv2d(c, f, geometry["kernel_size"], device="meta"), 2))
        layer = KronConv2d(c, f, geometry["kernel_size"], terms, stride=geometry["stride"],
                           padding=geometry["padding"], dilation=geometry["dilation"],
                           implementation="factored", dtype=F64)
        x = torch.randn(1, c, *geometry["hw"], dtype=F64)
    else:
        m, n = data.draw(st.sampled_from([2, 4, 6])), data.draw(st.sampled_from([2, 4, 6]))
        terms = data.draw(kron_terms(nn.Linear(n, m, device="meta"), 3))
        layer = KronLinear(n, m, terms, implementation="factored", dtype=F64)
        x = torch.randn(2, n, dtype=F64)
    names = [name for name, _ in layer.named_parameters()]

    def fn(inp, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (inp,))

    inputs = (x.requires_grad_(), *(p.detach().clone().requires_grad_()
                                    for p in layer.parameters()))
    assert torch.autograd.gradcheck(fn, inputs)
