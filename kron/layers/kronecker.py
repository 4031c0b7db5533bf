"""Kronecker-factored linear and convolution layers (Zhou et al., arXiv 1512.09194).

The weight is a sum of Kronecker products ``W = sum_i A_i (x) B_i`` in ``torch.kron``'s index
convention (A's index is the slow one). Terms may have different shapes (the paper's
"combinations of different shapes of Kronecker product"); repeated shapes give Kronecker rank and
are stored stacked, one parameter per distinct shape, so that each shape group runs as a single
pair of matmuls / convolutions. See docs/design.md (layers) for the maths and the storage.

``implementation`` chooses how the forward runs:

- ``"factored"``: never builds W (two contractions per shape group);
- ``"dense"``: composes W (cached while no gradient is needed) and runs one dense op;
- ``"triton"`` (KronLinear only): one fused Triton kernel per shape group
  (:mod:`kron.layers.triton_linear`);
- ``"auto"`` (default): a deterministic cost model from the layer's shapes, the input shape,
  the device type and whether autograd records (:mod:`kron.layers.cost_model`), unless a
  measured plan was applied (:func:`kron.layers.planning.apply_plan`). Nothing is timed in the
  forward and nothing is stored in the state dict.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kron.layers import cost_model
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
from kron.measure import conv2d_macs, linear_macs

IMPLEMENTATIONS = ("auto", "factored", "dense", "triton")
# Device types on which KronConv2d's factored path runs pointwise-A groups as one grouped conv
# plus one 1x1 conv (kron.layers.kron_conv_grouped); tests add "cpu" to check it there.
_GROUPED_CONV_DEVICES: tuple[str, ...] = ("cuda",)
# CPU inference runs in chunks whose intermediate holds at most this many elements per thread
# (1 MiB of float32), so that each thread's share stays in its L2 cache between the two stages.
_CHUNK_FLOATS = 1 << 18


def _chunk_budget() -> int:
    return _CHUNK_FLOATS * max(1, torch.get_num_threads())


def _tracing() -> bool:
    """Whether torch.compile or torch.export is tracing this call (no Python-side caches)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _example_size(size: int | torch.SymInt) -> int:
    """A dimension as an int. A symbolic one (a dynamic batch under torch.compile or
    torch.export) gives its example value without adding a guard: the traced program keeps
    the choice made at the example size for every size, instead of specialising to it."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else int(size)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes ``x``'s device's matmuls in, or None when it is off."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device_type`` if it is on (else does nothing)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _KroneckerSum(nn.Module):
    """Parameters and shared machinery of a sum of Kronecker products of given term shapes.

    Each shape group ``(a_shape, R)`` owns one parameter in ``a_factors`` and one in
    ``b_factors``, stored as :meth:`_stored_shape` says; :meth:`factor_pairs` gives them as
    ``(R, *a_shape)`` / ``(R, *b_shape)`` views for the maths.
    """

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
        allowed = self._implementations()
        if implementation not in allowed:
            raise ValueError(
                f"implementation={implementation!r} is not one of {', '.join(allowed)} "
                f"for {type(self).__name__}"
            )
        kw = {"device": device, "dtype": dtype}
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.terms = normalize_terms(type(self).__name__, self.weight_shape, terms)
        self.groups = group_terms(self.terms)
        self.implementation = implementation
        if implementation == "triton":
            self._require_triton(torch.device(device) if device is not None else
                                 torch.empty(0).device)
        self.a_factors = nn.ParameterList(
            nn.Parameter(torch.empty(self._stored_shape(rank, a), **kw)) for a, rank in self.groups
        )
        self.b_factors = nn.ParameterList(
            nn.Parameter(torch.empty(self._stored_shape(rank, b_shape_for(self.weight_shape, a)),
                                     **kw))
            for a, rank in self.groups
        )
        self.bias = nn.Parameter(torch.empty(self.weight_shape[0], **kw)) if bias else None
        # A measured choice for "auto" (kron.layers.plan.apply_plan): a plain attribute, never
        # part of the state dict.
        self.planned_implementation: str | None = None
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        self._workspaces: dict[tuple, torch.Tensor] = {}
        self.reset_parameters()

    @classmethod
    def _implementations(cls) -> tuple[str, ...]:
        return ("auto", "factored", "dense")

    def _require_triton(self, device: torch.device) -> None:
        raise ValueError(f"implementation='triton' is for KronLinear, not {type(self).__name__}")

    def _stored_shape(self, rank: int, shape: Shape) -> tuple[int, ...]:
        """Shape of the parameter holding ``rank`` stacked factors of ``shape``."""
        return (rank, *shape)

    def _factor_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(a (R, *a_shape), b (R, *b_shape))`` per shape group, views of the parameters."""
        pairs = []
        for (a_shape, rank), pa, pb in zip(self.groups, self.a_factors, self.b_factors):
            b_shape = b_shape_for(self.weight_shape, a_shape)
            pairs.append((pa.view(rank, *a_shape), pb.view(rank, *b_shape)))
        return pairs

    def factor_pairs(self, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor,
                                                                           torch.Tensor]]:
        """``(a (R, *a_shape), b (R, *b_shape))`` per shape group, contiguous (a parameter
        converted to channels_last is copied back: factors are small), cast to ``dtype`` when
        given (the autocast dtype); differentiable with respect to the parameters."""
        return [(a.to(dtype).contiguous() if dtype is not None else a.contiguous(),
                 b.to(dtype).contiguous() if dtype is not None else b.contiguous())
                for a, b in self._factor_views()]

    # -- construction ---------------------------------------------------------------------

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight_shape[1:])

    def reset_parameters(self) -> None:
        """Gaussian factors scaled so that the composed weight has the variance of PyTorch's
        default init, ``1 / (3 fan_in)``, split evenly over the terms:
        ``Var(W) = sum_i Var(A_i) Var(B_i)`` (docs/design.md, layers)."""
        std = factor_std(kaiming_std(self.fan_in), n_factors=2, n_terms=len(self.terms))
        with torch.no_grad():
            for p in [*self.a_factors, *self.b_factors]:
                p.normal_(0.0, std)
        init_bias_(self.bias, self.fan_in)

    def _load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None, sweeps: int) -> None:
        fitted = fit_kronecker_sum(weight, self.groups, sweeps=sweeps)
        with torch.no_grad():
            for (a, b), (pa, pb) in zip(fitted, self._factor_views()):
                pa.copy_(a)
                pb.copy_(b)
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias)

    # -- checkpoints ----------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """Also loads checkpoints of earlier versions: their ``_extra_state`` (the timed
        ``auto`` choices) is ignored, and factors stacked with another layout (conv factors
        used to be 5-D ``(R, *a_shape)``) are reshaped when their sizes match."""
        state_dict.pop(prefix + "_extra_state", None)
        for name, params in (("a_factors", self.a_factors), ("b_factors", self.b_factors)):
            for i, param in enumerate(params):
                key = f"{prefix}{name}.{i}"
                saved = state_dict.get(key)
                if (isinstance(saved, torch.Tensor) and saved.shape != param.shape
                        and saved.numel() == param.numel() and saved.shape[0] * saved.shape[1]
                        == param.shape[0] and saved.dim() == param.dim() + 1):
                    state_dict[key] = saved.reshape(param.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def __getstate__(self) -> dict:
        """Pickling and deepcopy leave the composed-weight cache and the workspaces behind."""
        state = self.__dict__.copy()
        state["_weight_cache"] = None
        state["_workspaces"] = {}
        return state

    # -- composed weight ------------------------------------------------------------------

    def dense_weight(self) -> torch.Tensor:
        """The composed weight ``sum_i A_i (x) B_i`` in ``nn.Linear`` / ``nn.Conv2d`` layout,
        in the parameters' dtype (also under autocast). Shape groups accumulate into one
        buffer: peak memory beyond W is one W-sized temporary (docs/design.md, memory)."""
        device_type = self.a_factors[0].device.type
        weight = None
        with _autocast_off(device_type):
            for a, b in self.factor_pairs():
                weight = kron_compose(a, b, out=weight)
        return weight

    def _factors_record_autograd(self) -> bool:
        return torch.is_grad_enabled() and any(
            p.requires_grad for p in [*self.a_factors, *self.b_factors])

    def _cached_dense_weight(self) -> torch.Tensor:
        """``dense_weight()``, reused while no gradient reaches the factors and none of them
        has changed. A weight composed under ``torch.inference_mode`` is an inference tensor,
        so the mode is part of the key (normal mode never reuses it)."""
        params = [*self.a_factors, *self.b_factors]
        if _tracing() or self._factors_record_autograd() or any(p.is_inference()
                                                                 for p in params):
            self._weight_cache = None
            return self.dense_weight()
        key = (torch.is_inference_mode_enabled(),
               *((p.data_ptr(), p._version, p.device, p.dtype) for p in params))
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = None
            with torch.no_grad():
                self._weight_cache = (key, self.dense_weight())
        return self._weight_cache[1]

    # -- execution ------------------------------------------------------------------------

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_factored(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        raise NotImplementedError

    def _records_autograd(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` builds an autograd graph (training), as opposed to
        inference, where the CPU paths may write into preallocated buffers."""
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _fast_cpu_inference(self, x: torch.Tensor) -> bool:
        """CPU inference outside tracing: run in cache-sized chunks into preallocated buffers.

        The first such call also sets up glibc's allocator for the process
        (:func:`kron.runtime.configure_allocator`; opt out with ``KRON_ALLOCATOR=system``):
        the chunks' first-stage convolutions allocate blocks that glibc otherwise maps and
        unmaps on every call, which measured 3.0x instead of 6.0x against dense for a 256->256
        3x3 conv at batch 32 in three of five fresh processes."""
        fast = x.device.type == "cpu" and not self._records_autograd(x) and not _tracing()
        if fast:
            from kron.runtime import configure_allocator

            configure_allocator()
        return fast

    def _workspace(self, x: torch.Tensor, numel: int) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements, reused across inference calls of this
        layer (per device, dtype and thread), so that chunked CPU inference does not allocate
        (and page-fault) its intermediates on every call. Never used when autograd records."""
        key = (x.device, x.dtype, threading.get_ident(), torch.is_inference_mode_enabled())
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, device=x.device, dtype=x.dtype)
            self._workspaces[key] = buf
        return buf[:numel]

    def workload(self, input_shape: Sequence[int], device_type: str) -> cost_model.Workload:
        """What the cost model needs to know about a forward on ``input_shape``."""
        raise NotImplementedError

    def _candidates(self, device_type: str) -> list[str]:
        return ["factored", "dense"]

    def rule_implementation(self, input_shape: Sequence[int], device_type: str,
                            training: bool) -> str:
        """What ``"auto"`` runs by the cost model for this input, device type and mode."""
        shape = [_example_size(s) for s in input_shape]
        return cost_model.choose(self.workload(shape, device_type),
                                 self._candidates(device_type), device_type, training)

    def resolved_implementation(self, x: torch.Tensor) -> str:
        """The implementation a forward on ``x`` runs: the configured one, else (``"auto"``)
        the applied plan, else the cost model's rule."""
        if self.implementation != "auto":
            return self.implementation
        if self.planned_implementation is not None:
            return self.planned_implementation
        return self.rule_implementation(x.shape, x.device.type, self._records_autograd(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.resolved_implementation(x)
        if not _tracing():
            self.last_implementation = impl
        return self.run_implementation(x, impl)

    def run_implementation(self, x: torch.Tensor, implementation: str) -> torch.Tensor:
        """The forward by a given implementation (what ``plan`` measures)."""
        dtype = _autocast_dtype(x)
        if implementation == "dense":
            return self._forward_dense(x)
        if dtype is not None:
            x = x.to(dtype)
        if implementation == "triton":
            return self._forward_triton(x, dtype)
        if implementation == "factored":
            return self._forward_factored(x, dtype)
        raise ValueError(f"unknown implementation {implementation!r} for {type(self).__name__}")

    def _forward_triton(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        raise ValueError(f"implementation='triton' is for KronLinear, not {type(self).__name__}")

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def _macs_implementation(self, implementation: str | None) -> str:
        """The implementation a MAC count refers to: the one asked for, else the configured
        one, with ``"auto"`` meaning what the last forward ran (factored before any)."""
        impl = implementation or self.implementation
        if impl == "auto":
            impl = getattr(self, "last_implementation", self.planned_implementation or "factored")
        return "factored" if impl == "triton" else impl

    def extra_repr_terms(self) -> str:
        groups = ", ".join(f"{a}x{r}" if r > 1 else f"{a}" for a, r in self.groups)
        return f"terms=[{groups}], implementation={self.implementation!r}"


class KronLinear(_KroneckerSum):
    """``y = x W^T + b`` with ``W (out x in) = sum_i A_i (x) B_i``, ``A_i: (m1_i, n1_i)``.

    ``terms`` lists the A shapes ``(m1, n1)``, one entry per Kronecker term; B of a term is
    ``(out_features // m1, in_features // n1)``. Factors of one shape are stored stacked,
    ``a_factors[g]: (R, m1, n1)``, ``b_factors[g]: (R, m2, n2)``. The factored forward computes
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
    def _implementations(cls) -> tuple[str, ...]:
        return IMPLEMENTATIONS

    def _require_triton(self, device: torch.device) -> None:
        from kron.layers.triton_linear import require_triton

        require_triton(device)

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

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"KronLinear expects inputs with last dimension {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return F.linear(x, self._cached_dense_weight(), self.bias)

    def _forward_factored(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        pairs = self.factor_pairs(dtype)
        bias = self._bias(x2.dtype)
        if self._fast_cpu_inference(x):
            out = self._inference_cpu(x2, pairs)
            if bias is not None:
                out.add_(bias)
        else:
            out = None
            for a, b in pairs:
                y = _kron_matvec(x2, a, b)
                out = y if out is None else out.add_(y)
            if bias is not None:
                out = out + bias
        return out.reshape(*lead, self.out_features)

    def _forward_triton(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        from kron.layers.triton_linear import kron_linear_triton, require_triton

        self._check_input(x)
        require_triton(x.device)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out = None
        for a, b in self.factor_pairs(dtype):
            y = kron_linear_triton(x2, a, b)
            out = y if out is None else out + y
        bias = self._bias(out.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, self.out_features)

    def _inference_cpu(self, x2: torch.Tensor, pairs: list) -> torch.Tensor:
        """CPU inference: rows in chunks whose intermediate fits in cache, every group
        accumulated into the output in place; the intermediate lives in a workspace reused
        across calls. Allocates nothing batch-sized but the output."""
        n_rows = x2.shape[0]
        out = x2.new_empty((n_rows, self.out_features))
        widest = max(_intermediate_per_row(a, b) for a, b in pairs)
        chunk = max(1, min(n_rows, _chunk_budget() // widest))
        ws = self._workspace(x2, chunk * widest)
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            for g, (a, b) in enumerate(pairs):
                _kron_matvec_into(x2[start:stop], a, b, out[start:stop], ws, accumulate=g > 0)
        return out

    def _dense_macs(self, input_shape: Sequence[int]) -> int:
        return linear_macs(input_shape, self.in_features, self.out_features)

    def _group_macs(self, input_shape: Sequence[int]) -> list[int]:
        """MACs of each shape group's factored forward on ``input_shape``."""
        rows = math.prod(input_shape[:-1])
        return [linear_group_macs(a, b_shape_for(self.weight_shape, a), r, rows)
                for a, r in self.groups]

    def workload(self, input_shape: Sequence[int], device_type: str) -> cost_model.Workload:
        macs = self._group_macs(input_shape)
        factored = {"factored": tuple(cost_model.GroupCost("linear", m, 3) for m in macs),
                    "triton": tuple(cost_model.GroupCost("linear_triton", m, 1) for m in macs)}
        return cost_model.Workload(self._dense_macs(input_shape), math.prod(self.weight_shape),
                                   tuple(r for _, r in self.groups), factored)

    def _candidates(self, device_type: str) -> list[str]:
        candidates = ["factored", "dense"]
        if device_type == "cuda" and torch.cuda.is_available() and self._triton_ok():
            candidates.append("triton")
        return candidates

    def _triton_ok(self) -> bool:
        """Triton can run here and its kernel handles every shape group in the factors' dtype."""
        from kron.layers import triton_linear

        if not triton_linear.triton_available():
            return False
        dtype = self.a_factors[0].dtype
        return all(triton_linear.triton_supports(a.shape, b.shape, dtype)
                   for a, b in self.factor_pairs())

    def analytic_macs(self, input_shape: Sequence[int], implementation: str | None = None) -> int:
        """Multiply-accumulates of the forward on ``input_shape`` (bias adds not counted)."""
        if self._macs_implementation(implementation) == "dense":
            return self._dense_macs(input_shape)
        return sum(self._group_macs(input_shape))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.extra_repr_terms()}")


def _kron_matvec(x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_r vec(A_r X B_r^T)`` for each row of ``x2 (N, n1*n2)``; ``a (R,m1,n1)``,
    ``b (R,m2,n2)``. Two GEMMs; the sum over r rides inside the second one's contraction by
    laying the first one's output out as ``(.., k, r, ..)``, so no intermediate is permuted."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    if linear_order((m1, n1), (m2, n2)) == "b":
        bt = b.reshape(rank * m2, n2).t()
        a2 = a.permute(1, 2, 0).reshape(m1, n1 * rank)  # [i, (k, r)]
        t = torch.mm(x2.reshape(-1, n2), bt)
        y = torch.matmul(a2, t.view(-1, n1 * rank, m2))  # (N, m1, m2)
    else:
        a2 = a.permute(1, 0, 2).reshape(m1 * rank, n1)  # [(i, r), k]
        u = torch.matmul(a2, x2.reshape(-1, n1, n2))  # (N, m1, r, l)
        b2 = b.permute(1, 0, 2).reshape(m2, rank * n2)  # [j, (r, l)]
        y = torch.mm(u.view(-1, rank * n2), b2.t())
    return y.reshape(x2.shape[0], m1 * m2)


def _intermediate_per_row(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements of :func:`_kron_matvec`'s intermediate per input row."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return n1 * rank * m2 if linear_order((m1, n1), (m2, n2)) == "b" else m1 * rank * n2


def _kron_matvec_into(
    x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, ws: torch.Tensor,
    accumulate: bool,
) -> None:
    """:func:`_kron_matvec` of a block of rows written (or, with ``accumulate``, added) into
    ``out (rows, m1*m2)``, its intermediate in the flat buffer ``ws`` (inference only: these
    ``out=`` writes are invisible to autograd)."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    rows = x2.shape[0]
    beta = 1 if accumulate else 0
    t = ws[: rows * _intermediate_per_row(a, b)]
    if linear_order((m1, n1), (m2, n2)) == "b":
        bt = b.reshape(rank * m2, n2).t()
        a2 = a.permute(1, 2, 0).reshape(m1, n1 * rank)
        t2 = t.view(rows * n1, rank * m2)
        torch.mm(x2.reshape(rows * n1, n2), bt, out=t2)
        target = out.view(rows, m1, m2)
        torch.baddbmm(target, a2.expand(rows, *a2.shape), t2.view(rows, n1 * rank, m2),
                      beta=beta, out=target)
    else:
        a2 = a.permute(1, 0, 2).reshape(m1 * rank, n1)
        b2 = b.permute(1, 0, 2).reshape(m2, rank * n2)
        u = t.view(rows, m1 * rank, n2)
        torch.bmm(a2.expand(rows, *a2.shape), x2.reshape(rows, n1, n2), out=u)
        target = out.view(rows * m1, m2)
        torch.addmm(target, u.view(rows * m1, rank * n2), b2.t(), beta=beta, out=target)


class KronConv2d(_KroneckerSum):
    """2-D convolution whose kernel is ``sum_i A_i (x) B_i`` (4-D ``torch.kron`` convention).

    ``terms`` lists A shapes ``(F1, C1, kh1, kw1)``; B is ``(F/F1, C/C1, kh/kh1, kw/kw1)``.
    Factors of one shape are stored as 4-D parameters, ``a_factors[g]: (R*F1, C1, kh1, kw1)``
    and ``b_factors[g]: (R*F2, C2, kh2, kw2)`` (term-major), so that
    ``model.to(memory_format=torch.channels_last)`` works on them like on any conv weight;
    :meth:`factor_pairs` views them as ``(R, F1, C1, kh1, kw1)`` / ``(R, F2, C2, kh2, kw2)``.
    Runs exactly as two convolutions per shape group (docs/design.md, layers): B over the
    padded input viewed as ``(N*C1, C2, H, W)``, then A across the C1 groups with dilation
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

    def _stored_shape(self, rank: int, shape: Shape) -> tuple[int, ...]:
        return (rank * shape[0], *shape[1:])

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

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"KronConv2d expects input (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return F.conv2d(x, self._cached_dense_weight(), self.bias, self.stride, self.padding,
                        self.dilation)

    def _forward_factored(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        self._check_input(x)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not (
            x.is_contiguous()
        )
        pairs = self.factor_pairs(dtype)
        bias = self._bias(x.dtype)
        if x.device.type in _GROUPED_CONV_DEVICES and any(is_pointwise(a) for a, _ in self.groups):
            out = self._factored_grouped(x, pairs)
            if bias is not None:
                out = out + bias.view(1, -1, 1, 1)
            return out.contiguous(memory_format=torch.channels_last) if channels_last else out
        x = x.contiguous()
        if self._fast_cpu_inference(x):
            out = self._factored_inference_cpu(x, pairs, bias)
        else:
            out = self._factored_block(x, pairs)
            if bias is not None:
                out = out + bias.view(1, -1, 1, 1)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _factored_grouped(self, x: torch.Tensor, pairs: list) -> torch.Tensor:
        """The factored forward with every pointwise-A group run as one grouped conv plus one
        1x1 mixing conv (:func:`kron.layers.kron_conv_grouped.pointwise_kron_conv`, fast in
        cuDNN, channels_last kept); the other groups run the two-stage path."""
        from kron.layers.kron_conv_grouped import pointwise_kron_conv

        out = None
        rest = []
        for (a_shape, _), (a, b) in zip(self.groups, pairs):
            if is_pointwise(a_shape):
                y = pointwise_kron_conv(x, a, b, self.stride, self.padding, self.dilation)
                out = y if out is None else out + y
            else:
                rest.append((a, b))
        if rest:
            y = self._factored_block(x.contiguous(), rest)
            out = out + y
        return out

    def _pad_plan(self) -> tuple[bool, tuple[int, int]]:
        """``(pad the input explicitly?, padding of the first-stage conv)``: with every A
        pointwise, padding the first conv equals padding the input; otherwise pad once."""
        if all(is_pointwise(a) for a, _ in self.groups) or not any(self.padding):
            return False, self.padding
        return True, (0, 0)

    def _factored_block(
        self, x: torch.Tensor, pairs: list, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All shape groups on a contiguous block of samples (no bias); writes into ``out``
        when given (the first group's result lands there directly on the pointwise path)."""
        explicit_pad, stage1_padding = self._pad_plan()
        if explicit_pad:
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph)).contiguous()  # pad may keep channels_last strides
        for i, (a, b) in enumerate(pairs):
            if i == 0:
                out = self._group_forward(x, a, b, stage1_padding, out=out)
            else:
                out = out.add_(self._group_forward(x, a, b, stage1_padding))
        return out

    def _factored_inference_cpu(
        self, x: torch.Tensor, pairs: list, bias: torch.Tensor | None
    ) -> torch.Tensor:
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
        for start in range(0, n, chunk):
            block = out[start : start + chunk]
            self._factored_block(x[start : start + chunk], pairs, out=block)
            if bias is not None:
                block.add_(bias.view(1, -1, 1, 1))
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
        z = F.conv2d(x.reshape(n * c1, c2, h, w), b.reshape(rank * f2, c2, kh2, kw2),
                     stride=stride1, padding=padding, dilation=self.dilation)
        # z is (N, C1, R, F2, h1, w1); contiguous: with a size-1 axis an input can count as
        # both memory formats, and the convolution may then return channels_last strides
        z = z.contiguous()
        h1, w1 = z.shape[-2:]
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

    def _dense_macs(self, input_shape: Sequence[int]) -> int:
        return conv2d_macs(input_shape, self.weight_shape, self.stride, self.padding,
                           self.dilation)

    def _group_macs(self, input_shape: Sequence[int]) -> list[int]:
        """MACs of each shape group's factored forward on ``(N, C, H, W)``."""
        return [conv_group_macs(self.geometry, a, b_shape_for(self.weight_shape, a), r,
                                input_shape) for a, r in self.groups]

    def workload(self, input_shape: Sequence[int], device_type: str) -> cost_model.Workload:
        grouped = (device_type in _GROUPED_CONV_DEVICES
                   and "conv_grouped" in cost_model.constants_for(device_type).penalty)
        groups = []
        for (a, _), macs in zip(self.groups, self._group_macs(input_shape)):
            kind = "conv_spatial"
            if is_pointwise(a):
                kind = "conv_grouped" if grouped else "conv_pointwise"
            groups.append(cost_model.GroupCost(kind, macs, 3))
        return cost_model.Workload(self._dense_macs(input_shape), math.prod(self.weight_shape),
                                   tuple(r for _, r in self.groups), {"factored": tuple(groups)})

    def analytic_macs(self, input_shape: Sequence[int], implementation: str | None = None) -> int:
        """Multiply-accumulates of the forward on ``(N, C, H, W)`` (bias adds not counted)."""
        if self._macs_implementation(implementation) == "dense":
            return self._dense_macs(input_shape)
        return sum(self._group_macs(input_shape))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, {self.extra_repr_terms()}")
