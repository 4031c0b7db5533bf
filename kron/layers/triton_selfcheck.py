"""A one-time numerical check of the Triton KronLinear kernel on a device before ``auto`` uses it.

``verified(device, dtype)`` runs :func:`kron.layers.triton_linear.kron_linear_triton` at a few
shapes (square, non-power-of-two padded tiles, several terms, transposed factor views as the
input gradient passes them) against the same sum computed by torch in float64 from the same
rounded inputs, and says whether every output is within :func:`tolerance`. The result is kept
in :data:`CHECKED`, so each ``(device, dtype)`` is checked once per process; a failure (wrong
numbers or an exception) warns once, naming the error, and ``auto`` keeps to the torch paths.
Nothing outside kron is changed: no torch or Triton setting, no environment variable.

The tolerance. The kernel computes ``Y_ij = sum_t c_t`` over the ``n1 R`` products
``c_t = A_rik T_rkj`` with ``T = X B_r^T``, both sums accumulated in fp32 (roundoff
``u_acc = 2^-24``). The operands are rounded first: in bf16/fp16 only ``T`` (to ``u_op`` =
2^-8 / 2^-11: X, A and B are already in the dtype); in fp32 with TF32 allowed all four
operands (``u_op = 2^-11``, about 4 roundings per product); in IEEE fp32 none. So
``E_ij ~= sum_t c_t delta_t`` with independent ``|delta_t| <= k u_op``: an error of either
sign whose standard deviation is about ``k u_op / sqrt(3) * ||c||_2``, while ``Y_ij`` itself,
for the random inputs used here, is of standard deviation ``||c||_2`` and ``max |Y|`` over the
check's outputs is at least twice that. Six standard deviations then stay below
``2 k u_op max|Y|``, plus half a roundoff for the store; accumulation adds about
``u_acc sqrt((n1 R + n2) / 6)`` relative. :func:`tolerance` allows
``8 (k u_op + u_acc sqrt(1 + (n1 R + n2) / 6))`` relative to the largest output, about 4
times the estimate: 0.031 in bf16, 0.0039 in fp16, 1.5e-6 in IEEE fp32. Measured: the kernel
in fp32 under the interpreter 1e-7, an exact emulation of bf16 hardware rounding 2.5e-3 to
4.6e-3. A kernel that drops a term or misreads a stride or mask is off by O(1) relative.

Under ``torch.compile`` tracing nothing is run: an unchecked pair counts as not verified
(the entrypoints can call ``verified`` before compiling). See docs/notes/gpu_kernels.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: The record of checked pairs: ``(device, dtype) -> passed`` for the shipped kernel (a
#: custom ``kernel`` given to :func:`verified` is keyed ``(device, dtype, kernel)``). Read it
#: to see what was checked; :func:`forget` clears it.
CHECKED: dict[tuple, bool] = {}

# (R, m1, n1, m2, n2): one tile, padded/masked odd sizes, several terms, A (m x 1) x B (1 x n)
SHAPES = ((1, 16, 16, 16, 16), (3, 5, 7, 12, 3), (2, 32, 16, 16, 32), (2, 16, 1, 1, 24))
ROWS = 5  # samples per check: more than one program, still tiny


def operand_roundoff(dtype: torch.dtype) -> tuple[float, int]:
    """``(u_op, k)``: the roundoff of the kernel's rounded operands and how many roundings
    each product carries (module docstring). IEEE fp32 rounds no operand."""
    if dtype == torch.float32:
        return (0.0, 0) if torch.get_float32_matmul_precision() == "highest" else (2.0**-11, 4)
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype], 1


def tolerance(dtype: torch.dtype, shape: tuple[int, int, int, int, int]) -> float:
    """Allowed ``max|Y - ref| / max|ref|`` for one shape (module docstring)."""
    rank, _, n1, _, n2 = shape
    u_op, k = operand_roundoff(dtype)
    return 8 * (k * u_op + 2.0**-24 * math.sqrt(1 + (n1 * rank + n2) / 6))


def _device_key(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_r A_r X_n B_r^T`` in float64 (the torch factored path's maths, exactly)."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    xv = x.double().reshape(-1, n1, n2)
    y = torch.einsum("rik,nkl,rjl->nij", a.double(), xv, b.double())
    return y.reshape(-1, m1 * m2)


def _inputs(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, transposed: bool):
    rank, m1, n1, m2, n2 = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(ROWS, n1 * n2, generator=gen).to(device, dtype)
    if transposed:  # factor views with swapped strides, as the input gradient passes them
        a = torch.randn(rank, n1, m1, generator=gen).to(device, dtype).transpose(1, 2)
        b = torch.randn(rank, n2, m2, generator=gen).to(device, dtype).transpose(1, 2)
    else:
        a = torch.randn(rank, m1, n1, generator=gen).to(device, dtype)
        b = torch.randn(rank, m2, n2, generator=gen).to(device, dtype)
    return x, a, b


def run_check(device: torch.device | str, dtype: torch.dtype, kernel: Kernel) -> str | None:
    """Run the check (uncached); ``None`` if it passes, else one line saying what failed."""
    device = torch.device(device)
    for shape in SHAPES:
        for transposed in (False, True):
            x, a, b = _inputs(shape, device, dtype, transposed)
            try:
                with torch.no_grad():
                    y = kernel(x, a, b)
            except Exception as err:  # noqa: BLE001 - any failure of the kernel rejects it
                line = (str(err).strip().splitlines() or [""])[0][:200]
                return f"{type(err).__name__}: {line}"
            ref = _reference(x, a, b)
            if tuple(y.shape) != tuple(ref.shape):
                return f"shape {tuple(y.shape)} != {tuple(ref.shape)} for factors {shape}"
            rel = float((y.double().cpu() - ref.cpu()).abs().max() / ref.abs().max())
            if not rel <= tolerance(dtype, shape):  # also rejects NaN
                return (f"max relative error {rel:.2e} > {tolerance(dtype, shape):.2e} for "
                        f"(R, m1, n1, m2, n2) = {shape}{' transposed' if transposed else ''}")
    return None


def verified(device: torch.device | str, dtype: torch.dtype, kernel: Kernel | None = None
             ) -> bool:
    """Whether the Triton kernel (or ``kernel``) gave correct numbers on ``device`` in
    ``dtype``; checked once per pair and recorded in :data:`CHECKED`. On failure: one
    warning naming the error, then False on every later call."""
    key = (_device_key(device), dtype) + (() if kernel is None else (kernel,))
    if key in CHECKED:
        return CHECKED[key]
    if torch.compiler.is_compiling():
        return False
    if kernel is None:
        from kron.layers.triton_linear import kron_linear_triton as kernel
    problem = run_check(device, dtype, kernel)
    CHECKED[key] = problem is None
    if problem is not None:
        warnings.warn(f"kron: the Triton KronLinear kernel failed its self-check on {key[0]} in "
                      f"{str(dtype).removeprefix('torch.')} ({problem}); implementation='auto' "
                      "uses the torch paths there", RuntimeWarning, stacklevel=2)
    return CHECKED[key]


def forget() -> None:
    """Clear the record of checked pairs (the next :func:`verified` call checks again)."""
    CHECKED.clear()
