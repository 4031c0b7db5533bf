"""Kronecker-factored linear and convolution layers (Zhou et al., arXiv 1512.09194).

The weight is a sum of Kronecker products ``W = sum_i A_i (x) B_i`` in ``torch.kron``'s index
convention (A's index is the slow one). Terms may have different shapes (the paper's
"combinations of different shapes of Kronecker product"); repeated shapes give Kronecker rank and
are stored stacked, one ``(R, *shape)`` parameter per distinct shape, so that each shape group
runs as a single pair of matmuls / convolutions. See DESIGN.md section 3 for the maths.

``implementation`` chooses how the forward runs:

- ``"factored"``: never builds W (two contractions per shape group);
- ``"dense"``: composes W (cached while no gradient is needed) and runs one dense op;
- ``"auto"`` (default): measures both at first use for each input shape, device, dtype and grad
  mode, and keeps the faster (:mod:`kron.layers.autotune`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kron.layers import autotune
from kron.layers.common import (
    conv_geometry,
    conv_kwargs,
    conv_output_size,
    factor_std,
    init_bias_,
    kaiming_std,
)
from kron.layers.decompose import b_shape_for, fit_kronecker_sum, kron_compose
from kron.layers.shapes import (
    ConvGeometry,
    Shape,
    conv_group_macs,
    group_terms,
    is_pointwise,
    linear_group_macs,
    linear_order,
    normalize_terms,
)

IMPLEMENTATIONS = ("auto", "factored", "dense")
# CPU inference runs in chunks whose intermediate holds at most this many elements per thread
# (1 MiB of float32), so that each thread's share stays in its L2 cache between the two stages.
_CHUNK_FLOATS = 1 << 18


def _chunk_budget() -> int:
    return _CHUNK_FLOATS * max(1, torch.get_num_threads())


class _KroneckerSum(nn.Module):
    """Parameters and shared machinery of a sum of Kronecker products of given term shapes."""

    def __init__(
        self,
        weight_shape: Shape,
        terms: Sequence[Sequence[int]],
        bias: bool,
        implementation: str,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}"
            )
        kw = {"device": device, "dtype": dtype}
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.terms = normalize_terms(type(self).__name__, self.weight_shape, terms)
        self.groups = group_terms(self.terms)
        self.implementation = implementation
        self.a_factors = nn.ParameterList(
            nn.Parameter(torch.empty((rank, *a), **kw)) for a, rank in self.groups
        )
        self.b_factors = nn.ParameterList(
            nn.Parameter(torch.empty((rank, *b_shape_for(self.weight_shape, a)), **kw))
            for a, rank in self.groups
        )
        self.bias = nn.Parameter(torch.empty(self.weight_shape[0], **kw)) if bias else None
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        self._auto_choices: dict[str, str] = {}  # input signature -> "factored" | "dense"
        self.reset_parameters()

    # -- construction ---------------------------------------------------------------------

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight_shape[1:])

    def reset_parameters(self) -> None:
        """Gaussian factors scaled so that the composed weight has the variance of PyTorch's
        default init, ``1 / (3 fan_in)``, split evenly over the terms:
        ``Var(W) = sum_i Var(A_i) Var(B_i)`` (DESIGN.md section 3)."""
        std = factor_std(kaiming_std(self.fan_in), n_factors=2, n_terms=len(self.terms))
        with torch.no_grad():
            for p in [*self.a_factors, *self.b_factors]:
                p.normal_(0.0, std)
        init_bias_(self.bias, self.fan_in)

    def _load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None, sweeps: int) -> None:
        fitted = fit_kronecker_sum(weight, self.groups, sweeps=sweeps)
        with torch.no_grad():
            for (a, b), pa, pb in zip(fitted, self.a_factors, self.b_factors):
                pa.copy_(a)
                pb.copy_(b)
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias)

    # -- composed weight ------------------------------------------------------------------

    def dense_weight(self) -> torch.Tensor:
        """The composed weight ``sum_i A_i (x) B_i`` in ``nn.Linear`` / ``nn.Conv2d`` layout."""
        weight = None
        for a, b in zip(self.a_factors, self.b_factors):
            part = kron_compose(a, b)
            weight = part if weight is None else weight + part
        return weight

    def _cached_dense_weight(self) -> torch.Tensor:
        """``dense_weight()``, reused while no gradient flows and no factor has changed."""
        params = [*self.a_factors, *self.b_factors]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self._weight_cache = None
            return self.dense_weight()
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        if self._weight_cache is None or self._weight_cache[0] != key:
            with torch.no_grad():
                self._weight_cache = (key, self.dense_weight())
        return self._weight_cache[1]

    # -- execution ------------------------------------------------------------------------

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_factored(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _signature(self) -> tuple:
        return (type(self).__name__, self.weight_shape, tuple(self.terms), self.bias is not None)

    def _records_autograd(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` builds an autograd graph (training), as opposed to
        inference, where the CPU paths may write into preallocated buffers."""
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def resolved_implementation(self, x: torch.Tensor) -> str:
        """``"factored"`` or ``"dense"``: what a forward on ``x`` runs (measures on first use
        under ``"auto"``; under ``torch.compile`` an unmeasured ``"auto"`` runs factored)."""
        if self.implementation != "auto":
            return self.implementation
        training = self._records_autograd(x)
        local_key = f"{tuple(x.shape)}|{x.device.type}|{x.dtype}|{training}|{x.is_contiguous()}"
        choice = self._auto_choices.get(local_key)
        if choice is not None:
            return choice
        key = (*self._signature(), local_key)
        choice = autotune.cached_choice(key)
        if choice is None and torch.compiler.is_compiling():
            return "factored"
        if choice is None:
            choice = self._measure_choice(key, x, training)
        self._auto_choices[local_key] = choice
        return choice

    def _measure_choice(self, key: tuple, x: torch.Tensor, training: bool) -> str:
        params = [*self.a_factors, *self.b_factors]

        def run(fn):
            if not training:
                return lambda: fn(x)
            inputs = [p for p in params if p.requires_grad]

            def step():
                out = fn(x)
                return torch.autograd.grad(out, inputs, torch.ones_like(out))

            return step

        with torch.set_grad_enabled(training):
            return autotune.choose(
                key,
                {"factored": run(self._forward_factored), "dense": run(self._forward_dense)},
                x.device,
            )

    def get_extra_state(self) -> dict:
        """The choices ``"auto"`` made, saved with the weights so that a resumed run executes
        the same implementation (and so gets bit-identical numbers) without re-measuring."""
        return {"auto_choices": dict(self._auto_choices)}

    def set_extra_state(self, state: dict) -> None:
        self._auto_choices.update(state.get("auto_choices", {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.resolved_implementation(x)
        self.last_implementation = impl
        if impl == "dense":
            return self._forward_dense(x)
        return self._forward_factored(x)

    def _macs_implementation(self, implementation: str | None) -> str:
        """The implementation a MAC count refers to: the one asked for, else the configured
        one, with ``"auto"`` meaning what the last forward ran (factored before any)."""
        impl = implementation or self.implementation
        if impl == "auto":
            impl = getattr(self, "last_implementation", "factored")
        return impl

    def extra_repr_terms(self) -> str:
        groups = ", ".join(f"{a}x{r}" if r > 1 else f"{a}" for a, r in self.groups)
        return f"terms=[{groups}], implementation={self.implementation!r}"


class KronLinear(_KroneckerSum):
    """``y = x W^T + b`` with ``W (out x in) = sum_i A_i (x) B_i``, ``A_i: (m1_i, n1_i)``.

    ``terms`` lists the A shapes ``(m1, n1)``, one entry per Kronecker term; B of a term is
    ``(out_features // m1, in_features // n1)``. The factored forward computes
    ``vec(A X B^T)`` with ``X = x.reshape(n1, n2)`` for all terms of one shape in two matmuls,
    contracting first with whichever factor makes that cheaper.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        terms: Sequence[Sequence[int]],
        bias: bool = True,
        implementation: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        super().__init__((self.out_features, self.in_features), terms, bias, implementation,
                         device, dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        terms: Sequence[Sequence[int]],
        implementation: str = "auto",
        sweeps: int = 10,
    ) -> KronLinear:
        """The Kronecker approximation of a trained ``nn.Linear`` (same dtype, device, bias).

        One term shape: the optimal fit (truncated SVD of the rearranged weight, Van Loan and
        Pitsianis). Mixed shapes: block coordinate descent, see
        :func:`kron.layers.decompose.fit_kronecker_sum`.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, terms, bias=linear.bias is not None,
                    implementation=implementation, device=w.device, dtype=w.dtype)
        layer._load_dense(w, linear.bias, sweeps)
        return layer

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._cached_dense_weight(), self.bias)

    def _forward_factored(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"KronLinear expects inputs with last dimension {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        chunked = x.device.type == "cpu" and not self._records_autograd(x)
        out = None
        for a, b in zip(self.a_factors, self.b_factors):
            y = _kron_matvec(x2, a, b, chunked)
            out = y if out is None else out.add_(y)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def analytic_macs(self, input_shape: Sequence[int], implementation: str | None = None) -> int:
        """Multiply-accumulates of the forward on ``input_shape`` (bias adds not counted)."""
        rows = math.prod(input_shape[:-1])
        if self._macs_implementation(implementation) == "dense":
            return rows * self.in_features * self.out_features
        return sum(
            linear_group_macs(a, b_shape_for(self.weight_shape, a), r, rows) for a, r in self.groups
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.extra_repr_terms()}")


def _kron_matvec(
    x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, chunked: bool = False
) -> torch.Tensor:
    """``sum_r vec(A_r X B_r^T)`` for each row of ``x2 (N, n1*n2)``; ``a (R,m1,n1)``,
    ``b (R,m2,n2)``. Two GEMMs; the sum over r rides inside the second one's contraction by
    laying the first one's output out as ``(.., k, r, ..)``, so no intermediate is permuted.
    ``chunked`` (CPU inference only: it writes into buffers autograd cannot track) runs the
    B-first order in cache-sized chunks of rows."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    if linear_order((m1, n1), (m2, n2)) == "b":
        bt = b.reshape(rank * m2, n2).t()
        a2 = a.permute(1, 2, 0).reshape(m1, n1 * rank)  # [i, (k, r)]
        if not chunked:
            t = torch.mm(x2.reshape(-1, n2), bt)
            y = torch.matmul(a2, t.view(-1, n1 * rank, m2))  # (N, m1, m2)
        else:
            y = _b_first_chunked(x2, a2, bt, n1 * rank, m2)
    else:
        a2 = a.permute(1, 0, 2).reshape(m1 * rank, n1)  # [(i, r), k]
        u = torch.matmul(a2, x2.view(-1, n1, n2))  # (N, m1, r, l)
        b2 = b.permute(1, 0, 2).reshape(m2, rank * n2)  # [j, (r, l)]
        y = torch.mm(u.view(-1, rank * n2), b2.t())
    return y.reshape(x2.shape[0], m1 * m2)


def _b_first_chunked(
    x2: torch.Tensor, a2: torch.Tensor, bt: torch.Tensor, k: int, m2: int
) -> torch.Tensor:
    """CPU inference path of the B-first product: rows in chunks whose intermediate fits in
    cache, written into preallocated buffers (a whole-batch intermediate of a large layer does
    not fit in cache, and a fresh large allocation costs page faults on every call)."""
    n_rows = x2.shape[0]
    n2 = bt.shape[0]
    n1 = x2.shape[1] // n2
    chunk = max(1, min(n_rows, _chunk_budget() // (n1 * bt.shape[1])))
    xv = x2.reshape(n_rows * n1, n2)
    out = x2.new_empty((n_rows, a2.shape[0], m2))
    buf = x2.new_empty((chunk * n1, bt.shape[1]))
    a2e = a2.expand(chunk, *a2.shape)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        rows = stop - start
        t = buf[: rows * n1]
        torch.mm(xv[start * n1 : stop * n1], bt, out=t)
        torch.bmm(a2e[:rows], t.view(rows, k, m2), out=out[start:stop])
    return out


class KronConv2d(_KroneckerSum):
    """2-D convolution whose kernel is ``sum_i A_i (x) B_i`` (4-D ``torch.kron`` convention).

    ``terms`` lists A shapes ``(F1, C1, kh1, kw1)``; B is ``(F/F1, C/C1, kh/kh1, kw/kw1)``.
    Runs exactly as two convolutions per shape group (DESIGN.md section 3): B over the padded
    input viewed as ``(N*C1, C2, H, W)``, then A across the C1 groups with dilation
    ``(kh2, kw2)`` times the layer's, and the layer's stride. When A is 1x1 in space the second
    stage is a single batched matmul and the stride moves into the first stage.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        terms: Sequence[Sequence[int]],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        implementation: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(
            kernel_size, stride, padding, dilation)
        self.geometry = ConvGeometry(self.stride, self.padding, self.dilation)
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        super().__init__(shape, terms, bias, implementation, device, dtype)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        terms: Sequence[Sequence[int]],
        implementation: str = "auto",
        sweeps: int = 10,
    ) -> KronConv2d:
        """The Kronecker approximation of a trained ``nn.Conv2d`` (same dtype, device, bias,
        stride, padding, dilation); optimal for one term shape, see
        :meth:`KronLinear.from_linear`."""
        layer = cls(terms=terms, implementation=implementation, **conv_kwargs(conv))
        layer._load_dense(conv.weight, conv.bias, sweeps)
        return layer

    def _signature(self) -> tuple:
        return (*super()._signature(), self.stride, self.padding, self.dilation)

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._cached_dense_weight(), self.bias, self.stride, self.padding,
                        self.dilation)

    def _forward_factored(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"KronConv2d expects input (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not (
            x.is_contiguous()
        )
        x = x.contiguous()
        if self._records_autograd(x) or x.device.type != "cpu":
            out = self._factored_block(x)
            if self.bias is not None:
                out = out + self.bias.view(1, -1, 1, 1)
        else:
            out = self._factored_inference_cpu(x)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _pad_plan(self) -> tuple[bool, tuple[int, int]]:
        """``(pad the input explicitly?, padding of the first-stage conv)``: with every A
        pointwise, padding the first conv equals padding the input; otherwise pad once."""
        if all(is_pointwise(a) for a, _ in self.groups) or not any(self.padding):
            return False, self.padding
        return True, (0, 0)

    def _factored_block(
        self, x: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All shape groups on a contiguous block of samples (no bias); writes into ``out``
        when given (the first group's result lands there directly on the pointwise path)."""
        explicit_pad, stage1_padding = self._pad_plan()
        if explicit_pad:
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph))
        for i, (a, b) in enumerate(zip(self.a_factors, self.b_factors)):
            if i == 0:
                out = self._group_forward(x, a, b, stage1_padding, out=out)
            else:
                out.add_(self._group_forward(x, a, b, stage1_padding))
        return out

    def _factored_inference_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """Inference on CPU in chunks of samples whose intermediate fits in cache: the
        intermediate of a whole batch is as large as a feature map of the full layer, and
        streaming it through memory twice costs more than the small second stage itself."""
        n = x.shape[0]
        ho, wo = self.output_size(x.shape[-2:])
        per_sample = max(
            a[1] * r * (self.weight_shape[0] // a[0]) * x.shape[2] * x.shape[3]
            for a, r in self.groups
        )
        chunk = max(1, min(n, _chunk_budget() // per_sample))
        out = x.new_empty((n, self.out_channels, ho, wo))
        bias = None if self.bias is None else self.bias.view(1, -1, 1, 1)
        for start in range(0, n, chunk):
            block = out[start : start + chunk]
            self._factored_block(x[start : start + chunk], out=block)
            if bias is not None:
                block.add_(bias)
        return out

    def _group_forward(
        self,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        padding: tuple[int, int],
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n, _, h, w = x.shape
        rank, f1, c1, kh1, kw1 = a.shape
        _, f2, c2, kh2, kw2 = b.shape
        stride1, pointwise = self.geometry.stage_plan(tuple(a.shape[1:]))
        z = F.conv2d(x.view(n * c1, c2, h, w), b.reshape(rank * f2, c2, kh2, kw2),
                     stride=stride1, padding=padding, dilation=self.dilation)
        h1, w1 = z.shape[-2:]  # z is (N, C1, R, F2, h1, w1)
        if pointwise:
            a2 = a.reshape(rank, f1, c1).permute(1, 2, 0).reshape(f1, c1 * rank)  # [f1,(c1,r)]
            z = z.view(n, c1 * rank, f2 * h1 * w1)
            if out is not None:
                torch.matmul(a2, z, out=out.view(n, f1, f2 * h1 * w1))
                return out
            return torch.matmul(a2, z).view(n, f1 * f2, h1, w1)
        zt = (z.view(n, c1, rank, f2, h1, w1).permute(0, 3, 1, 2, 4, 5)
              .reshape(n * f2, c1 * rank, h1, w1))
        a2 = a.permute(1, 2, 0, 3, 4).reshape(f1, c1 * rank, kh1, kw1)  # [f1, (c1, r)]
        dil2 = (self.dilation[0] * kh2, self.dilation[1] * kw2)
        y = F.conv2d(zt, a2, stride=self.stride, dilation=dil2)
        ho, wo = y.shape[-2:]
        y = y.view(n, f2, f1, ho, wo).transpose(1, 2)
        if out is not None:
            out.view(n, f1, f2, ho, wo).copy_(y)
            return out
        return y.reshape(n, f1 * f2, ho, wo)

    def output_size(self, hw: Sequence[int]) -> tuple[int, int]:
        return conv_output_size(tuple(hw), self.kernel_size, self.stride, self.padding,
                                self.dilation)

    def analytic_macs(self, input_shape: Sequence[int], implementation: str | None = None) -> int:
        """Multiply-accumulates of the forward on ``(N, C, H, W)`` (bias adds not counted)."""
        if self._macs_implementation(implementation) == "dense":
            ho, wo = self.output_size(input_shape[2:])
            return input_shape[0] * math.prod(self.weight_shape) * ho * wo
        return sum(
            conv_group_macs(self.geometry, a, b_shape_for(self.weight_shape, a), r, input_shape)
            for a, r in self.groups
        )

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, {self.extra_repr_terms()}")
