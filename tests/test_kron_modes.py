"""KronLinear / KronConv2d in every PyTorch mode a researcher uses with nn.Linear / nn.Conv2d:
channels_last, autocast (CPU, and CUDA where present), inference_mode then training, frozen
factors, torch.compile (fullgraph), torch.export, deepcopy and pickling, state_dict round trips,
the memory bound of composing W, and what CPU inference allocates."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kron.layers import KronConv2d, KronLinear

IMPLS = ["factored", "composed"]


def make_linear(impl: str, dtype=torch.float32, **kw) -> KronLinear:
    torch.manual_seed(0)
    return KronLinear(64, 32, [(4, 8), (8, 4), (4, 8)], implementation=impl, dtype=dtype, **kw)


def make_conv(impl: str, dtype=torch.float32, **kw) -> KronConv2d:
    torch.manual_seed(0)
    return KronConv2d(8, 6, 3, [(2, 4, 1, 1), (3, 2, 3, 1), (2, 4, 1, 1)], padding=1,
                      implementation=impl, dtype=dtype, **kw)


def reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's function from torch.kron of its factors, in float64."""
    w = sum(torch.kron(a[r], b[r]).double() for a, b in layer.factor_pairs()
            for r in range(a.shape[0]))
    bias = layer.bias.double()
    if isinstance(layer, KronLinear):
        return F.linear(x.double(), w, bias)
    return F.conv2d(x.double(), w, bias, layer.stride, layer.padding, layer.dilation)


def inputs(layer) -> torch.Tensor:
    torch.manual_seed(1)
    if isinstance(layer, KronLinear):
        return torch.randn(3, 5, 64)
    return torch.randn(4, 8, 9, 7)


MAKERS = [make_linear, make_conv]


# ----------------------------------------------------------------------------- channels_last


class SmallNet(nn.Module):
    def __init__(self, impl: str) -> None:
        super().__init__()
        self.conv1 = KronConv2d(4, 8, 3, [(2, 2, 1, 1), (2, 2, 1, 1)], padding=1,
                                implementation=impl)
        self.conv2 = KronConv2d(8, 8, 4, [(2, 4, 2, 2), (4, 2, 1, 1)], stride=2, padding=1,
                                implementation=impl)
        self.bn = nn.BatchNorm2d(8)
        self.fc = KronLinear(8 * 4 * 4, 10, [(2, 8)], implementation=impl)

    def forward(self, x):
        x = self.bn(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("impl", [*IMPLS, "auto"])
def test_channels_last_model_conversion_keeps_outputs_and_trains(impl):
    """model.to(memory_format=torch.channels_last) converts the 4-D conv factors and keeps the
    outputs; the converted model trains."""
    torch.manual_seed(0)
    net = SmallNet(impl).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        before = net(x)
    net = net.to(memory_format=torch.channels_last)
    assert net.conv1.b_factors[0].is_contiguous(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(net(x_cl), before, rtol=1e-5, atol=1e-6)
    net.train()
    net(x_cl).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_channels_last_factors_give_the_same_gradients():
    conv = make_conv("factored")
    other = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    x = inputs(conv)
    for layer in (conv, other):
        layer(x).square().sum().backward()
    for p, q in zip(conv.parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad.contiguous(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ autocast


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("make", MAKERS, ids=["linear", "conv"])
def test_cpu_autocast_bf16_returns_bf16_within_its_precision(make, impl, grad):
    layer = make(impl)
    x = inputs(layer)
    twin = nn.Linear(64, 32) if isinstance(layer, KronLinear) else nn.Conv2d(8, 6, 3, padding=1)
    with torch.autocast("cpu", torch.bfloat16), torch.set_grad_enabled(grad):
        y = layer(x)
        expected_dtype = twin(x).dtype
    assert expected_dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    ref = reference(layer, x)
    # bf16 keeps 8 bits of mantissa: inputs, factors and (two-stage) intermediates round at
    # 2^-8 relative; errors of a sum of K such products grow like sqrt(K)
    torch.testing.assert_close(y.double(), ref, rtol=0.03, atol=0.03 * ref.abs().max().item())
    if grad:
        y.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32
                   for p in layer.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("make", MAKERS, ids=["linear", "conv"])
def test_cuda_autocast_returns_autocast_dtype(make, impl, dtype):
    layer = make(impl).cuda()
    x = inputs(layer).cuda()
    with torch.autocast("cuda", dtype):
        y = layer(x)
    assert y.dtype == dtype
    ref = reference(layer, x)
    torch.testing.assert_close(y.double(), ref, rtol=0.03, atol=0.03 * ref.abs().max().item())


# ------------------------------------------------------------- inference_mode, frozen factors


@pytest.mark.parametrize("impl", [*IMPLS, "auto"])
@pytest.mark.parametrize("make", MAKERS, ids=["linear", "conv"])
def test_inference_mode_then_training(make, impl):
    """The composed-weight cache must not hand an inference tensor to autograd."""
    layer = make(impl)
    x = inputs(layer)
    with torch.inference_mode():
        y_inf = layer(x)
    for frozen in (True, False):  # frozen first: the cache is used only then
        for p in [*layer.a_factors, *layer.b_factors]:
            p.requires_grad_(not frozen)
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.square().sum().backward()
        torch.testing.assert_close(y.detach(), y_inf, rtol=1e-5, atol=1e-5)
        ref_x = x.double().requires_grad_(True)
        reference(layer, ref_x).square().sum().backward()
        torch.testing.assert_close(xg.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", [*IMPLS, "auto"])
@pytest.mark.parametrize("make", MAKERS, ids=["linear", "conv"])
def test_frozen_factors_train_the_bias_only(make, impl):
    layer = make(impl)
    for p in [*layer.a_factors, *layer.b_factors]:
        p.requires_grad_(False)
    x = inputs(layer)
    layer(x).sum().backward()
    assert all(p.grad is None for p in [*layer.a_factors, *layer.b_factors])
    # d(sum y)/d bias = number of output positions per channel
    per_channel = x.shape[:-1].numel() if isinstance(layer, KronLinear) else (
        x.shape[0] * x.shape[2] * x.shape[3])
    torch.testing.assert_close(layer.bias.grad, torch.full_like(layer.bias, per_channel))


# ------------------------------------------------------------------ torch.compile / export


def _compiled_matches_eager(layer, backend: str) -> None:
    torch._dynamo.reset()
    x = inputs(layer).requires_grad_(True)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    gx = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    y_eager = layer(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference takes the other branch: must compile too
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, impl", [
    (make_linear, "factored"),
    (make_conv, "dense"),
    pytest.param(make_linear, "dense", marks=pytest.mark.slow),
    pytest.param(make_conv, "factored", marks=pytest.mark.slow),
    pytest.param(make_linear, "auto", marks=pytest.mark.slow),
    pytest.param(make_conv, "auto", marks=pytest.mark.slow),
], ids=["linear-factored", "conv-dense", "linear-dense", "conv-factored", "linear-auto",
        "conv-auto"])
def test_compile_fullgraph_traces_forward_and_backward(make, impl):
    """fullgraph=True fails on any graph break inside the layer; aot_eager runs the traced
    forward and backward graphs without Inductor's (slow) code generation. Two cases run by
    default (a few seconds each), the rest with the slow tests."""
    _compiled_matches_eager(make(impl), "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("make", MAKERS, ids=["linear", "conv"])
def test_compile_inductor_matches_eager(make, impl):
    _compiled_matches_eager(make(impl), "inductor")


@pytest.mark.parametrize("impl", [*IMPLS, "auto"])
@pytest.mark.parametrize("make", MAKERS, ids=["linear", "conv"])
def test_export_matches_eager(make, impl):
    layer = make(impl).eval()
    x = inputs(layer)
    program = torch.export.export(layer, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program.module()(x).double(), reference(layer, x),
                                   rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ deepcopy and state dicts


@pytest.mark.parametrize("impl", [*IMPLS, "auto"])
@pytest.mark.parametrize("make", MAKERS, ids=["linear", "conv"])
def test_deepcopy_after_use_is_independent(make, impl):
    """A used layer pickles to the bytes it pickled to before use (the composed-weight cache,
    the CPU workspaces and auto's memoised rule stay behind; deepcopy goes the same way), and
    its deep copy is an independent layer."""
    layer = make(impl)
    x = inputs(layer)
    unused = pickle.dumps(layer)
    with torch.inference_mode():  # fills the caches: dense an inference tensor, factored
        layer(x)  # its workspaces, auto its rule
    with torch.no_grad():
        layer(x)
    assert pickle.dumps(layer) == unused
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x))
        twin.a_factors[0].mul_(2)
        assert not torch.allclose(twin(x), layer(x))


@pytest.mark.parametrize("make", MAKERS, ids=["linear", "conv"])
def test_state_dict_round_trip_has_only_weights(make):
    layer = make("auto")
    x = inputs(layer)
    layer.planned_implementation = "composed"
    state = layer.state_dict()
    assert set(state) == {"a_factors.0", "a_factors.1", "b_factors.0", "b_factors.1", "bias"}
    other = make("auto")
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(state)
    assert other.planned_implementation is None  # a plan is not a weight
    with torch.no_grad():
        torch.testing.assert_close(other(x), layer(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ composing memory


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any single op produces (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("make_layer", [
    lambda: KronLinear(576, 256, [(16, 24)] * 16),  # the case, scaled down
    lambda: KronLinear(576, 256, [(16, 24)] * 4 + [(8, 8)] * 4 + [(32, 3)]),
    lambda: KronConv2d(64, 64, 3, [(8, 8, 1, 1)] * 8 + [(4, 4, 3, 1)] * 3),
], ids=["linear_rank16", "linear_mixed", "conv_mixed"])
def test_composing_w_never_builds_a_larger_temporary_than_w(make_layer, grad):
    """The old compose built an R-fold ``(R, *W)`` product before summing; now no op outputs
    more than W itself, forward or backward."""
    layer = make_layer()
    w_bytes = layer.dense_weight().numel() * 4
    mode = LargestOutput()
    with torch.set_grad_enabled(grad), mode:
        w = layer.dense_weight()
        if grad:
            w.square().sum().backward()
    assert 0 < mode.largest <= w_bytes
    torch.testing.assert_close(w.detach(), sum(torch.kron(a[r], b[r])
                                               for a, b in layer.factor_pairs()
                                               for r in range(a.shape[0])).detach(),
                               rtol=1e-4, atol=1e-6)


# ------------------------------------------------- implementations of the other helpers' kernels


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("terms, stride, padding, dilation", [
    ([(2, 4, 1, 1), (2, 4, 1, 1)], 1, 1, 1),  # all pointwise: only the grouped path
    ([(2, 4, 1, 1), (3, 2, 3, 1)], 2, (1, 2), (2, 1)),  # mixed: grouped + two-stage
])
def test_grouped_conv_path_matches_reference(monkeypatch, terms, stride, padding, dilation,
                                             channels_last):
    """The CUDA factored path for pointwise-A groups (grouped conv + 1x1 conv), forced on the
    CPU: values and gradients equal the torch.kron reference."""
    from kron.layers import kron_conv_grouped

    monkeypatch.setattr(KronConv2d, "grouped_conv_devices", ("cpu", "cuda"))
    calls = []
    original = kron_conv_grouped.pointwise_kron_conv
    monkeypatch.setattr(kron_conv_grouped, "pointwise_kron_conv",
                        lambda *args: calls.append(1) or original(*args))
    torch.manual_seed(0)
    layer = KronConv2d(8, 6, 3, terms, stride=stride, padding=padding, dilation=dilation,
                       implementation="factored", dtype=torch.float64)
    x = torch.randn(3, 8, 11, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert len(calls) == 1  # one call for the (single) pointwise shape group
    xr = x.detach().clone().requires_grad_(True)
    ref = reference(layer, xr)
    torch.testing.assert_close(y, ref)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [xr, *layer.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("terms", [[(4, 4)] * 2, [(4, 4), (2, 8), (4, 4)]])
def test_triton_implementation_matches_reference(monkeypatch, terms):
    """implementation='triton' (one fused kernel per shape group, summed, bias after) through
    Triton's CPU interpreter: values and gradients equal the torch.kron reference."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer = KronLinear(32, 16, terms, implementation="triton", device=device)
    x = torch.randn(2, 3, 32, device=device, requires_grad=True)
    y = layer(x)
    xr = x.detach().double().requires_grad_(True)
    ref = reference(layer, xr)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    (ref_gx,) = torch.autograd.grad(ref.square().sum(), xr)
    torch.testing.assert_close(x.grad.double(), ref_gx, rtol=1e-4, atol=1e-4)
    dense = KronLinear(32, 16, terms, implementation="composed", device=device)
    dense.load_state_dict(layer.state_dict())
    dense(x.detach()).square().sum().backward()
    for p, q in zip(layer.parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def test_triton_without_a_usable_device_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError) as info:
        KronLinear(32, 16, [(4, 4)], implementation="triton", device="cpu")
    assert "implementation='factored'" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="use one of auto, factored, composed$"):
        KronConv2d(8, 6, 3, [(2, 4, 1, 1)], implementation="triton")


# ------------------------------------------------------------ CPU inference allocations


class NewStorages(TorchDispatchMode):
    """Records (data pointer -> bytes) of every storage an op allocates: the outputs whose
    schema aliases no input (not a view, not an in-place or ``out=`` write into an existing
    buffer such as a layer's workspace)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, outs):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                s = t.untyped_storage()
                self.storages[s.data_ptr()] = s.nbytes()
        return out


def allocated_besides_output(layer, x) -> list[int]:
    """Sizes of the storages a second forward on ``x`` allocates, besides its output (the
    first call sets up what the layer keeps), largest first."""
    with torch.no_grad():
        layer(x)
        seen = NewStorages()
        with seen:
            y = layer(x)
    seen.storages.pop(y.untyped_storage().data_ptr())
    return sorted(seen.storages.values(), reverse=True)


def test_linear_cpu_inference_allocates_only_its_output():
    """After the first call, the chunked CPU path writes its intermediates into the layer's
    reused workspace: the output is the only new storage of a call."""
    layer = KronLinear(64, 32, [(4, 8), (8, 2), (4, 8)], implementation="factored")
    layer.inference_chunk_floats = 2000  # several chunks of rows
    x = torch.randn(37, 64)
    sizes = allocated_besides_output(layer, x)
    # what remains are the factors' permuted copies (a few hundred bytes), nothing row-sized
    assert all(size <= 64 * 4 * 4 for size in sizes), sizes
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding, mode", [(1, "zeros"), ("same", "reflect")])
def test_conv_cpu_inference_allocates_only_its_output(padding, mode):
    """Pointwise-A conv inference on the CPU (A's matmul into the layer's workspace, then
    B's conv producing the output): after the first call nothing batch-sized but the output
    is allocated (with a non-zero padding mode, the padded intermediate too)."""
    torch.manual_seed(0)
    layer = KronConv2d(16, 16, 3, [(4, 4, 1, 1), (4, 4, 1, 1)], padding=padding,
                       padding_mode=mode, implementation="factored")
    x = torch.randn(8, 16, 9, 7)
    big = [size for size in allocated_besides_output(layer, x) if size > 16 * 9 * 4 * 4]
    padded = 8 * (4 * 2 * 4) * 11 * 9 * 4  # A's output (F1 * R * C2 channels), padded
    assert big == ([] if mode == "zeros" else [padded]), big
    dense = torch.nn.Conv2d(16, 16, 3, padding=padding, padding_mode=mode)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ torch.compile, dynamic shapes


def _compiled_dynamic_trains(backend: str, grad: bool) -> None:
    """``torch.compile(dynamic=True)`` of KronConv2d (A first, B first with a stride, spatial
    A, grouped with reflect padding) over inputs of changing batch, height and width: outputs
    and input gradients equal eager's (float32, sums of <= 72 products: 1e-4)."""
    torch.manual_seed(0)
    layers = [KronConv2d(8, 6, 3, [(2, 4, 1, 1)], padding=1, implementation="factored"),
              KronConv2d(8, 6, 3, [(2, 4, 1, 1)], stride=2, padding=1, implementation="factored"),
              KronConv2d(8, 6, 3, [(3, 2, 3, 1)], padding=1, implementation="factored"),
              KronConv2d(8, 6, 3, [(3, 2, 1, 1)], padding="same", groups=2,
                         padding_mode="reflect", implementation="factored")]
    for layer in layers:
        torch._dynamo.reset()
        compiled = torch.compile(layer, dynamic=True, backend=backend)
        for shape in [(2, 8, 9, 9), (3, 8, 12, 10)]:
            x = torch.randn(shape, requires_grad=grad)
            with torch.set_grad_enabled(grad):
                y, want = compiled(x), layer(x)
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
            if grad:
                g = torch.randn_like(y)
                (got,) = torch.autograd.grad(y, x, g)
                (ref,) = torch.autograd.grad(want, x, g)
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_compile_dynamic_shapes_trains_kron_conv():
    _compiled_dynamic_trains("aot_eager", grad=True)


@pytest.mark.slow
def test_compile_dynamic_shapes_inductor_inference():
    _compiled_dynamic_trains("inductor", grad=False)


@pytest.mark.slow
def test_compile_dynamic_shapes_inductor_training():
    """Compiled training runs the conv-only formulation (no reshape between the stages):
    Inductor's CPU layout pass cannot order the strides of a saved 4-D view with symbolic
    sizes (issue 19: ``cannot determine truth value of Relational``)."""
    _compiled_dynamic_trains("inductor", grad=True)
