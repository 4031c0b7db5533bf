"""The Triton kernel's self-check: the real kernel passes (interpreter on CPU in float32, or
the GPU), kernels that return wrong numbers or raise are rejected with one warning, a kernel
that rounds as bf16 hardware does passes the bf16 bound, and the record is per pair."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from kron.layers import kron_compose
from kron.layers import triton_selfcheck as sc

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _fresh_record():
    """Each test starts with no checked pairs and full fp32 matmul precision (no TF32)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    sc.forget()
    yield
    sc.forget()
    torch.set_float32_matmul_precision(precision)


def exact(x, a, b):
    """The kernel's maths, ``x @ (sum_r kron(A_r, B_r))^T``, in float64 (any device),
    returned in the input dtype."""
    return (x.double() @ kron_compose(a.double(), b.double()).T).to(x.dtype)


def rounds_like_bf16_hardware(x, a, b):
    """T = X B^T accumulated in fp32 and rounded to bf16, then A T accumulated in fp32 and
    rounded to bf16 on store: the rounding the Triton kernel does on a GPU."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    xv = x.float().reshape(-1, n1, n2)
    t = torch.einsum("nkl,rjl->nrkj", xv, b.float()).to(torch.bfloat16).float()
    y = torch.einsum("rik,nrkj->nij", a.float(), t)
    return y.reshape(-1, m1 * m2).to(torch.bfloat16)


def drops_last_term(x, a, b):
    return exact(x, a[:-1], b[:-1]) if a.shape[0] > 1 else exact(x, a, b)


def off_by_a_little(x, a, b):
    return exact(x, a, b) * (1 + 1e-3)


def raises(x, a, b):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_correct_maths_passes_in_float32_and_bfloat16():
    assert sc.verified("cpu", torch.float32, kernel=exact)
    assert sc.verified("cpu", torch.bfloat16, kernel=rounds_like_bf16_hardware)


@pytest.mark.parametrize("kernel, words", [
    (drops_last_term, "max relative error"),
    (off_by_a_little, "max relative error"),
    (raises, "RuntimeError: CUDA error: an illegal memory access"),
])
def test_wrong_or_failing_kernels_are_rejected_with_one_warning(kernel, words):
    with pytest.warns(RuntimeWarning, match=words) as record:
        assert not sc.verified("cpu", torch.float32, kernel=kernel)
    assert len(record) == 1 and "uses the torch paths" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call neither re-runs nor warns again
        assert not sc.verified("cpu", torch.float32, kernel=kernel)
    assert sc.CHECKED == {("cpu", torch.float32, kernel): False}


def test_dropping_a_term_fails_even_the_bf16_bound():
    def bf16_missing_a_term(x, a, b):
        keep = max(1, a.shape[0] - 1)
        return rounds_like_bf16_hardware(x, a[:keep], b[:keep]) if a.shape[0] > 1 else (
            rounds_like_bf16_hardware(x, a, b) * 1.5)

    with pytest.warns(RuntimeWarning, match="max relative error"):
        assert not sc.verified("cpu", torch.bfloat16, kernel=bf16_missing_a_term)


def test_the_record_is_per_pair_and_runs_once():
    calls = []

    def counting(x, a, b):
        calls.append(x.dtype)
        return exact(x, a, b)

    assert sc.verified("cpu", torch.float32, kernel=counting)
    n = len(calls)
    assert n == 2 * len(sc.SHAPES) and sc.verified("cpu", torch.float32, kernel=counting)
    assert len(calls) == n  # cached
    sc.forget()
    assert sc.verified("cpu", torch.float32, kernel=counting) and len(calls) == 2 * n


def test_tolerance_per_dtype():
    shape = (2, 16, 16, 16, 16)  # n1 R + n2 = 48: accumulation term sqrt(1 + 8) = 3 roundoffs
    acc = 8 * 3 * 2.0**-24
    assert sc.tolerance(torch.bfloat16, shape) == pytest.approx(8 * 2**-8 + acc)
    assert sc.tolerance(torch.float16, shape) == pytest.approx(8 * 2**-11 + acc)
    assert sc.tolerance(torch.float32, shape) == pytest.approx(acc)
    torch.set_float32_matmul_precision("high")  # TF32 allowed: four operand roundings
    assert sc.tolerance(torch.float32, shape) == pytest.approx(8 * 4 * 2**-11 + acc)


def test_the_shipped_kernel_passes_and_changes_no_setting(monkeypatch):
    pytest.importorskip("triton")
    from kron.layers import triton_linear  # noqa: F401 - importing Triton sets its own env
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    env = dict(os.environ)
    precision = torch.get_float32_matmul_precision()
    assert sc.verified(DEVICE, torch.float32)
    assert dict(os.environ) == env and torch.get_float32_matmul_precision() == precision
    key = (str(torch.device("cuda", torch.cuda.current_device())) if CUDA else "cpu",
           torch.float32)
    assert sc.CHECKED == {key: True}


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_shipped_kernel_passes_in_16_bit_on_the_gpu(dtype):
    pytest.importorskip("triton")
    assert sc.verified("cuda", dtype)


def test_without_triton_on_the_cpu_the_check_fails_with_the_install_hint(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if CUDA:
        pytest.skip("CPU tensors without the interpreter: only meaningful without a GPU")
    with pytest.warns(RuntimeWarning, match="kron\\[triton\\]"):
        assert not sc.verified("cpu", torch.float32)


def test_auto_offers_triton_on_cuda_only_once_the_self_check_passed(monkeypatch):
    # auto's candidate list on a CUDA device: triton joins factored and composed only when the
    # kernel can run and its self-check passed for the dtype it would run in (checked once)
    from kron.layers import KronLinear, triton_linear

    layer = KronLinear(64, 64, terms=[(8, 8)])
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_linear, "triton_available", lambda: True)
    for passed in (False, True):
        monkeypatch.setattr(sc, "verified", lambda dev, dt, ok=passed: asked.append(dt) or ok)
        expected = ["factored", "composed"] + (["triton"] if passed else [])
        assert layer.candidates("cuda") == expected
    assert asked == [torch.float32, torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.candidates("cuda")
    assert asked[-1] == torch.bfloat16  # the dtype it would run in under autocast
