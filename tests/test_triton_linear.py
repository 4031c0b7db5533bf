"""Fused Triton Kronecker-linear kernel: values and gradients against the dense reference.

Without a GPU the kernel runs on CPU tensors through Triton's interpreter: TRITON_INTERPRET=1 is
set for this module's tests only (the kernel is jitted lazily at its first launch, so the
variable need not be set before triton is imported, and other modules never see it). With a GPU
the same tests run the compiled kernel on CUDA tensors.
"""

from __future__ import annotations

import functools

import pytest
import torch

triton = pytest.importorskip("triton")

from kron.layers import triton_linear  # noqa: E402
from kron.layers.triton_linear import (  # noqa: E402
    kron_linear_triton,
    require_triton,
    triton_available,
    triton_supports,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Error bound relative to the largest reference entry: fp32 is exact up to summation order;
# fp16/bf16 round inputs, the intermediate X B^T and the output.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (R, m1, n1, m2, n2)
CASES = [
    (1, 16, 16, 16, 16),
    (2, 32, 16, 16, 32),
    (3, 5, 7, 12, 3),  # nothing a power of two or >= 16: padded, masked tiles
    (2, 16, 1, 1, 24),  # A (m x 1) (x) B (1 x n): rank-1 low rank
]


@pytest.fixture(autouse=True, scope="module")
def _kernel_mode():
    """Triton's CPU interpreter for this module's tests when there is no GPU; full fp32 matmul
    precision (no TF32, for the kernel and the reference alike) whatever other tests set."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    with pytest.MonkeyPatch.context() as patch:
        if not CUDA:
            patch.setenv("TRITON_INTERPRET", "1")
        yield
    torch.set_float32_matmul_precision(precision)


@functools.cache
def _bf16_dot_works() -> bool:
    """Triton 3.8's interpreter returns garbage for tl.dot on bf16 operands (loads, stores and
    casts are fine); probe it rather than assume, so that a fixed Triton runs the bf16 tests."""
    if CUDA:
        return True
    x = torch.eye(16, dtype=torch.bfloat16).unsqueeze(0)
    y = kron_linear_triton(torch.ones(1, 256, dtype=torch.bfloat16), x, x)
    return torch.equal(y, torch.ones_like(y))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _factors(case, dtype, n_rows=3, seed=0):
    rank, m1, n1, m2, n2 = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()

    return rand(n_rows, n1 * n2), rand(rank, m1, n1), rand(rank, m2, n2)


def _dense_reference(x, groups, grad_y):
    """Output and gradients of F.linear with W = sum over groups and terms of kron(A_r, B_r),
    in float64 on the CPU."""
    x64 = x.detach().cpu().double().requires_grad_()
    facs = [(a.detach().cpu().double().requires_grad_(), b.detach().cpu().double().requires_grad_())
            for a, b in groups]
    weight = sum(torch.kron(a[r], b[r]) for a, b in facs for r in range(a.shape[0]))
    y = torch.nn.functional.linear(x64, weight)
    y.backward(grad_y.detach().cpu().double())
    return y.detach(), x64.grad, [(a.grad, b.grad) for a, b in facs]


def _assert_close(got, want, dtype, what):
    err = (got.detach().cpu().double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "R{}_{}x{}_{}x{}".format(*c))
def test_values_and_gradients_match_dense(case, dtype):
    if dtype is torch.bfloat16 and not _bf16_dot_works():
        pytest.skip("Triton's interpreter computes tl.dot wrongly on bf16 (probed); GPU-only")
    x, a, b = _factors(case, dtype)
    y = kron_linear_triton(x, a, b)
    assert y.dtype == dtype and y.shape == (x.shape[0], case[1] * case[3])
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y.backward(grad_y)
    y_ref, gx_ref, [(ga_ref, gb_ref)] = _dense_reference(x, [(a, b)], grad_y)
    _assert_close(y, y_ref, dtype, "y")
    _assert_close(x.grad, gx_ref, dtype, "dx")
    _assert_close(a.grad, ga_ref, dtype, "dA")
    _assert_close(b.grad, gb_ref, dtype, "dB")
    assert a.grad.dtype == dtype and b.grad.dtype == dtype


def test_mixed_shape_groups_called_separately_sum_to_dense():
    """Terms of different shapes (the paper's combinations of shapes): one launch per shape
    group, summed, equals the dense layer of all terms."""
    x, a1, b1 = _factors((2, 4, 8, 8, 4), torch.float32, seed=2)
    _, a2, b2 = _factors((1, 16, 2, 2, 16), torch.float32, seed=3)
    y = kron_linear_triton(x, a1, b1) + kron_linear_triton(x, a2, b2)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y.backward(grad_y)
    y_ref, gx_ref, grads = _dense_reference(x, [(a1, b1), (a2, b2)], grad_y)
    _assert_close(y, y_ref, torch.float32, "y")
    _assert_close(x.grad, gx_ref, torch.float32, "dx")
    for (a, b), (ga, gb) in zip([(a1, b1), (a2, b2)], grads):
        _assert_close(a.grad, ga, torch.float32, "dA")
        _assert_close(b.grad, gb, torch.float32, "dB")


def test_strided_factor_views_and_inputs():
    """Factors are read through their strides (no copy) and inputs may be non-contiguous."""
    x, a, b = _factors((2, 16, 8, 4, 16), torch.float32, n_rows=4, seed=5)
    at = a.detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    bt = b.detach().transpose(1, 2).contiguous().transpose(1, 2)
    want = kron_linear_triton(x.detach(), a.detach(), b.detach())
    assert not at.is_contiguous() and not bt.is_contiguous()
    torch.testing.assert_close(kron_linear_triton(x.detach(), at, bt), want)
    xv = torch.stack([x.detach(), x.detach()], dim=2)[..., 0]  # stride 2 in the feature dim
    assert not xv.is_contiguous()
    torch.testing.assert_close(kron_linear_triton(xv, a.detach(), b.detach()), want)


def test_empty_batch_and_single_row():
    x, a, b = _factors((1, 16, 4, 4, 16), torch.float32, n_rows=1, seed=6)
    y = kron_linear_triton(x, a, b)
    ref = x.detach().cpu() @ torch.kron(a[0], b[0]).detach().cpu().T
    torch.testing.assert_close(y.detach().cpu(), ref, rtol=1e-5, atol=1e-5)
    empty = kron_linear_triton(x[:0], a, b)
    assert empty.shape == (0, 64)


def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast the output has the autocast dtype (as F.linear's) and the fp32 factors
    still get fp32 gradients."""
    x, a, b = _factors((1, 16, 16, 16, 16), torch.float32, seed=7)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = kron_linear_triton(x, a, b)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    y_ref, gx_ref, [(ga_ref, _)] = _dense_reference(x, [(a, b)], torch.ones(y.shape))
    _assert_close(y, y_ref, torch.float16, "y")
    _assert_close(a.grad, ga_ref, torch.float16, "dA")


def test_bad_inputs_raise_one_line_errors():
    x, a, b = _factors((1, 16, 16, 16, 16), torch.float32)
    with pytest.raises(ValueError, match="input width"):
        kron_linear_triton(x[:, :100], a, b)
    with pytest.raises(ValueError, match="expects x2"):
        kron_linear_triton(x, a[0], b)
    with pytest.raises(ValueError, match="dtypes differ"):
        kron_linear_triton(x.double(), a, b)
    with pytest.raises(ValueError, match="different devices"):
        kron_linear_triton(x, a.to("meta"), b)
    big_a = torch.zeros(1, 256, 1, device=DEVICE)
    with pytest.raises(ValueError, match="triton_supports"):
        kron_linear_triton(x, big_a, torch.zeros(1, 1, 256, device=DEVICE))


def test_triton_supports():
    assert triton_supports((1, 64, 64), (4, 64, 64), torch.bfloat16)
    assert triton_supports((64, 64), (64, 64), torch.float32)
    assert triton_supports((2, 3, 5), (2, 7, 1), torch.float16)  # padded to 16
    assert triton_supports((1, 128, 100), (1, 128, 128), torch.bfloat16)
    assert not triton_supports((1, 129, 64), (1, 64, 64), torch.float16)  # tile 256 > 128
    assert triton_supports((1, 64, 33), (1, 64, 64), torch.float32)
    assert not triton_supports((1, 65, 64), (1, 64, 64), torch.float32)  # fp32 tile 128 > 64
    assert not triton_supports((1, 64, 64), (1, 64, 64), torch.float64)
    assert not triton_supports((1, 64, 64), (1, 64, 64), torch.int32)


def test_require_triton_names_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not CUDA:
        assert not triton_available()
    with pytest.raises(RuntimeError, match=r"pip install 'kron\[triton\]'"):
        require_triton("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available()
    require_triton("cpu")
    monkeypatch.setattr(triton_linear, "triton", None)
    assert not triton_available()
    with pytest.raises(RuntimeError, match="implementation='factored'"):
        require_triton(DEVICE)


def test_runs_inside_torch_compile():
    """Dynamo cannot trace the kernel launch; the function runs eagerly inside compiled code
    (graph break) with the same values and gradients."""
    x, a, b = _factors((1, 16, 16, 16, 16), torch.float32, seed=8)
    compiled = torch.compile(lambda x, a, b: kron_linear_triton(x, a, b).relu(), backend="eager")
    y = compiled(x, a, b)
    y.sum().backward()
    y_ref, _, [(ga_ref, _)] = _dense_reference(x, [(a, b)], (y > 0).to(y.dtype))
    _assert_close(y, y_ref.relu(), torch.float32, "y")
    _assert_close(a.grad, ga_ref, torch.float32, "dA")


def _compile_for(capability: int, dtype: str, tiles: tuple[int, int, int, int], precision):
    """Compile the kernel ahead of time for an NVIDIA target (Triton's bundled ptxas; no GPU
    needed): what the interpreter cannot check, i.e. that the real code generation accepts it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(triton_linear.kron_sum_kernel)  # compiled, whatever TRITON_INTERPRET says
    constexprs = dict(zip(("BM1", "BN1", "BM2", "BN2"), tiles), PRECISION=precision)
    signature = {
        name: "constexpr" if name in constexprs else f"*{dtype}" if name.endswith("_ptr") else "i32"
        for name in fn.arg_names
    }
    largest = max(tiles[0] * tiles[1], tiles[1] * tiles[3], tiles[2] * tiles[3])
    return triton.compile(ASTSource(fn, signature, constexprs),
                          target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": 4 if largest <= 64 * 64 else 8})


def _nvidia_backend_or_skip():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as err:
        pytest.skip(f"Triton's NVIDIA backend is not installed: {err}")


@pytest.mark.parametrize("dtype,precision", [("bf16", None), ("fp16", None), ("fp32", "tf32"),
                                             ("fp32", "ieee")])
def test_compiles_for_hopper(dtype, precision):
    _nvidia_backend_or_skip()
    kernel = _compile_for(90, dtype, (16, 16, 16, 32), precision)
    assert "kron_sum_kernel" in kernel.asm["ptx"]


@pytest.mark.slow
@pytest.mark.parametrize("capability,smem_kib", [(90, 227), (80, 163)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_largest_supported_tiles_fit_in_shared_memory(capability, smem_kib, dtype):
    """MAX_TILE is what the compiler says fits: the largest tiles triton_supports accepts use
    at most the shared memory of one block on an H100 (sm_90) and an A100 (sm_80)."""
    _nvidia_backend_or_skip()
    side = triton_linear.MAX_TILE[dtype]
    assert triton_supports((side, side), (side, side), dtype)
    name, precision = ("bf16", None) if dtype is torch.bfloat16 else ("fp32", "tf32")
    kernel = _compile_for(capability, name, (side,) * 4, precision)
    assert kernel.metadata.shared <= smem_kib * 1024
