"""Fused Triton kernel for one shape group of a Kronecker linear layer (docs/notes/gpu_kernels.md).

For every sample ``n`` it computes ``Y_n = sum_r A_r X_n B_r^T`` with ``X_n`` the sample's input
viewed row-major as ``(n1, n2)`` and ``Y_n`` the output viewed as ``(m1, m2)``: that is
``y = x W^T`` for ``W = sum_r kron(A_r, B_r)`` in ``torch.kron``'s index convention. One program
per sample loads ``X_n`` as a tile once; per term it runs two ``tl.dot``s, ``T = X_n B_r^T`` and
``A_r T``, accumulating ``Y_n`` in fp32 registers, so neither ``W`` nor the intermediate ``T``
ever reaches memory. All terms of one shape run in one launch.

The input gradient is the same kernel on transposed factors (``dX_n = sum_r A_r^T dY_n B_r``);
the factor gradients are batched GEMMs in torch.

Triton is an optional dependency (``pip install 'kron[triton]'``); this module imports without
it, and :func:`require_triton` says what to do when it is missing. The kernel is jitted on first
use, so ``TRITON_INTERPRET=1`` (run on CPU tensors, used by the tests) takes effect whenever it
is set before the first call.
"""

from __future__ import annotations

import os

import torch

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

INSTALL_HINT = (
    "implementation='triton' needs Triton and a CUDA device: pip install 'kron[triton]' "
    "or use implementation='factored'"
)
# tl.dot needs every tile dimension >= 16; smaller factor dimensions are padded (masked) to 16.
MIN_TILE = 16
# The whole (padded) factor and sample tiles of a sample live in one program. Compiled for sm_90
# (Triton 3.8, no GPU needed to compile): 16-bit 64^4 tiles use 24 KiB of shared memory, 128^4
# 96 KiB (with register spills); fp32 with TF32 64^4 tiles 128 KiB, 64x128 288 KiB, over an
# H100's 227 KiB per block. So 128 per dimension for fp16/bf16, 64 for fp32 (docs/design.md).
MAX_TILE = {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64}


def _interpret_mode() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (env ``TRITON_INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """Triton is importable and kernels can run: a CUDA device, or ``TRITON_INTERPRET=1``."""
    return triton is not None and (torch.cuda.is_available() or _interpret_mode())


def require_triton(device: torch.device | str) -> None:
    """Raise a one-line ``RuntimeError`` naming the fix when Triton cannot run on ``device``."""
    device = torch.device(device)
    usable = triton is not None and (
        (device.type == "cuda" and torch.cuda.is_available())
        or (device.type == "cpu" and _interpret_mode())
    )
    if not usable:
        raise RuntimeError(INSTALL_HINT)


def _tile(d: int) -> int:
    """Padded tile size of a factor dimension: a power of two, at least ``MIN_TILE``."""
    return max(MIN_TILE, 1 << max(0, int(d) - 1).bit_length())


def triton_supports(
    a_shape: tuple[int, ...] | torch.Size, b_shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
) -> bool:
    """Whether the kernel handles factors of these shapes (``(R, m1, n1)``/``(R, m2, n2)``, or
    the per-term ``(m1, n1)``/``(m2, n2)``) in ``dtype``: fp32/fp16/bf16, every padded tile
    dimension at most ``MAX_TILE[dtype]``. Callers fall back to the torch path when False."""
    if dtype not in MAX_TILE:
        return False
    a_shape, b_shape = tuple(a_shape)[-2:], tuple(b_shape)[-2:]
    if len(a_shape) != 2 or len(b_shape) != 2:
        return False
    dims = (*a_shape, *b_shape)
    return all(d >= 1 and _tile(d) <= MAX_TILE[dtype] for d in dims)


if tl is not None:

    def kron_sum_kernel(
        x_ptr, a_ptr, b_ptr, y_ptr,
        n_terms, m1, n1, m2, n2,
        stride_xn, stride_yn,
        stride_ar, stride_ai, stride_ak,
        stride_br, stride_bj, stride_bl,
        BM1: tl.constexpr, BN1: tl.constexpr, BM2: tl.constexpr, BN2: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One program per sample: Y = sum_r A_r X B_r^T on padded, masked tiles.

        Undecorated (defined only where Triton is installed): ``triton.jit`` it for a launch
        (:func:`_kernel` does, for the interpreter mode in force), or compile it ahead of time
        for a GPU target with ``triton.compile`` (no GPU needed: the tests check code
        generation that way). X is row ``pid`` of x viewed (n1, n2) row-major; A_r[i, k] and
        B_r[j, l] are read through strides, so transposed factor views (the input gradient)
        need no copy."""
        pid = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BM1)
        k = tl.arange(0, BN1)
        j = tl.arange(0, BM2)
        l = tl.arange(0, BN2)  # noqa: E741 - the DESIGN index names (i, k | j, l)
        x_mask = (k[:, None] < n1) & (l[None, :] < n2)
        x = tl.load(x_ptr + pid * stride_xn + k[:, None] * n2 + l[None, :], mask=x_mask,
                    other=0.0)  # (BN1, BN2)
        a_mask = (i[:, None] < m1) & (k[None, :] < n1)
        bt_mask = (l[:, None] < n2) & (j[None, :] < m2)
        acc = tl.full((BM1, BM2), 0.0, tl.float32)  # a builtin, unlike tl.zeros (see _kernel)
        for r in range(n_terms):
            # B_r^T tile (BN2, BM2): element [l, j] = B_r[j, l].
            bt = tl.load(b_ptr + r * stride_br + l[:, None] * stride_bl + j[None, :] * stride_bj,
                         mask=bt_mask, other=0.0)
            t = tl.dot(x, bt, input_precision=PRECISION)  # (BN1, BM2), fp32
            a = tl.load(a_ptr + r * stride_ar + i[:, None] * stride_ai + k[None, :] * stride_ak,
                        mask=a_mask, other=0.0)  # (BM1, BN1)
            acc = tl.dot(a, t.to(a.dtype), acc, input_precision=PRECISION)
        y_mask = (i[:, None] < m1) & (j[None, :] < m2)
        tl.store(y_ptr + pid * stride_yn + i[:, None] * m2 + j[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=y_mask)


_JITTED: dict[bool, object] = {}


def _kernel():
    """The jitted kernel for the current interpreter mode (Triton decides at decoration).

    Jitting here rather than at import lets ``TRITON_INTERPRET`` be set after ``import triton``.
    That holds only because the kernel calls core builtins alone: Triton's own ``@jit``
    helpers (``tl.zeros``, ``tl.sum``, ...) were jitted for the mode in force when triton was
    imported, and a kernel calling them fails in the other mode."""
    mode = _interpret_mode()
    if mode not in _JITTED:
        _JITTED[mode] = triton.jit(kron_sum_kernel)
    return _JITTED[mode]


def _fp32_precision() -> str:
    """TF32 for fp32 inputs exactly when torch's own fp32 matmuls may use it, so that the
    kernel and ``F.linear`` are compared at the same precision."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _launch(x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Run the kernel: ``x2 (N, n1*n2)`` contiguous rows, ``a (R, m1, n1)``, ``b (R, m2, n2)``
    (any strides) -> ``(N, m1*m2)`` in ``x2``'s dtype."""
    n_rows = x2.shape[0]
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    y = torch.empty((n_rows, m1 * m2), device=x2.device, dtype=x2.dtype)
    if n_rows == 0:
        return y
    if rank == 0:
        return y.zero_()
    x2 = x2.contiguous()
    tiles = (_tile(m1), _tile(n1), _tile(m2), _tile(n2))
    largest = max(tiles[0] * tiles[1], tiles[1] * tiles[3], tiles[1] * tiles[2],
                  tiles[0] * tiles[2], tiles[2] * tiles[3])
    _kernel()[(n_rows,)](
        x2, a, b, y,
        rank, m1, n1, m2, n2,
        n1 * n2, m1 * m2,
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        BM1=tiles[0], BN1=tiles[1], BM2=tiles[2], BN2=tiles[3],
        PRECISION=_fp32_precision() if x2.dtype == torch.float32 else None,  # backend default
        num_warps=4 if largest <= 64 * 64 else 8,
    )
    return y


def _factor_grads(
    g: torch.Tensor, x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dA_r = sum_n G_n B_r X_n^T`` and ``dB_r = sum_n G_n^T A_r X_n`` as two GEMMs each;
    ``g (N, m1*m2)``, ``x2 (N, n1*n2)``."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    n_rows = x2.shape[0]
    gv = g.reshape(n_rows, m1, m2)
    xv = x2.reshape(n_rows, n1, n2)
    grad_a = grad_b = None
    if need_a:
        # U[n, i, r, l] = (G_n B_r)[i, l], then contract (n, l) with X[n, k, l].
        u = torch.mm(g.reshape(n_rows * m1, m2), b.permute(1, 0, 2).reshape(m2, rank * n2))
        grad_a = torch.einsum("nirl,nkl->rik", u.view(n_rows, m1, rank, n2), xv)
    if need_b:
        # V[n, r, k, j] = (A_r^T G_n)[k, j], then contract (n, k) with X[n, k, l].
        v = torch.matmul(a.transpose(1, 2).reshape(rank * n1, m1), gv)  # (N, R*n1, m2)
        grad_b = torch.einsum("nrkj,nkl->rjl", v.view(n_rows, rank, n1, m2), xv)
    return grad_a, grad_b


class _KronSumTriton(torch.autograd.Function):
    """Forward and input gradient by the fused kernel; factor gradients by torch GEMMs."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x2 = x2.contiguous()
        ctx.save_for_backward(x2, a, b)
        return _launch(x2, a, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x2, a, b = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        need_x, need_a, need_b = ctx.needs_input_grad
        grad_x = _launch(grad_y, a.transpose(1, 2), b.transpose(1, 2)) if need_x else None
        grad_a, grad_b = _factor_grads(grad_y, x2, a, b, need_a, need_b)
        return grad_x, grad_a, grad_b


@torch.compiler.disable  # dynamo cannot trace the launch: run it eagerly inside compiled code
def kron_linear_triton(x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``y (N, m1*m2)`` with ``y[n] = sum_r vec(A_r X_n B_r^T)``, ``X_n = x2[n].view(n1, n2)``:
    ``x2 @ (sum_r kron(A_r, B_r))^T`` without building the weight (differentiable in all three).

    ``x2 (N, n1*n2)``, ``a (R, m1, n1)``, ``b (R, m2, n2)``, one dtype (fp32/fp16/bf16); under
    autocast all three run in the autocast dtype, as ``F.linear`` would. Callers reshape other
    batch shapes to 2-D and check :func:`triton_supports` first."""
    if x2.dim() != 2 or a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"kron_linear_triton expects x2 (N, n1*n2), a (R, m1, n1), b (R, m2, n2); got "
            f"{tuple(x2.shape)}, {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if x2.shape[1] != a.shape[2] * b.shape[2]:
        raise ValueError(
            f"kron_linear_triton: input width {x2.shape[1]} != n1*n2 = {a.shape[2]}*{b.shape[2]}"
        )
    if not (x2.device == a.device == b.device):
        raise ValueError(
            f"kron_linear_triton: tensors on different devices (x {x2.device}, a {a.device}, "
            f"b {b.device}); move them to one device"
        )
    require_triton(x2.device)
    if torch.is_autocast_enabled(x2.device.type):
        dtype = torch.get_autocast_dtype(x2.device.type)
        x2, a, b = x2.to(dtype), a.to(dtype), b.to(dtype)
    if not (x2.dtype == a.dtype == b.dtype):
        raise ValueError(
            f"kron_linear_triton: dtypes differ (x {x2.dtype}, a {a.dtype}, b {b.dtype}); "
            "cast them to one dtype or run under autocast"
        )
    if not triton_supports(a.shape, b.shape, x2.dtype):
        raise ValueError(
            f"kron_linear_triton does not support factors {tuple(a.shape)}, {tuple(b.shape)} in "
            f"{x2.dtype} (fp32 tiles <= 64, fp16/bf16 <= 128); check triton_supports() first"
        )
    return _KronSumTriton.apply(x2, a, b)
