"""The parameters and shared machinery of a sum of Kronecker products (docs/design.md, section 1).

The weight is ``W = sum_i A_i (x) B_i`` in ``torch.kron``'s index convention (A's index is the
slow one). Terms may have different shapes; repeated shapes give Kronecker rank and are stored
stacked, one parameter per distinct shape ("term group"), so that each term group runs as one
pair of contractions. A grouped conv is ``groups`` independent blocks, each with its own
factors (stored block-major in the same parameter).

``implementation`` chooses how the forward runs: ``"factored"`` (never builds W), ``"composed"``
(composes W, cached while no gradient is needed, and runs one dense op; ``"dense"`` is its old
name, still accepted: docs/notes/names.md), ``"triton"`` (KronLinear on CUDA), or
``"auto"``: a deterministic cost model of the layer's shapes, the input shape, the device type
and whether autograd records (:mod:`kron.layers.cost_model`), unless a measured plan pinned a
choice (``planned_implementation``, set by :mod:`kron.planning`). Nothing is timed in the
forward, nothing chosen is stored in the state dict, and no process-wide setting is touched.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import torch
from torch import nn

from kron.layers import cost_model
from kron.layers.common import factor_std, init_bias_, kaiming_std
from kron.layers.decompose import b_shape_for, fit_kronecker_sum, kron_compose_blocks
from kron.layers.errors import FactorizationError
from kron.layers.shapes import Shape, group_terms, normalize_terms


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing this call (no Python-side caches)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def example_size(size: int | torch.SymInt) -> int:
    """A dimension as an int. A symbolic one (a dynamic size under torch.compile or
    torch.export) gives its example value without adding a guard: the traced program keeps
    the choice made at the example size for every size, instead of specialising to it."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else int(size)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


#: old implementation names, accepted wherever a name comes in (docs/notes/names.md)
OLD_IMPLEMENTATIONS = {"dense": "composed"}


def implementation_name(name: str) -> str:
    """Today's name of an implementation (``"dense"`` -> ``"composed"``; others unchanged)."""
    return OLD_IMPLEMENTATIONS.get(name, name)


class KroneckerSum(nn.Module):
    """Factors of ``blocks`` independent sums of Kronecker products, each of ``block_shape``.

    Term group ``g`` with A shape ``a`` and rank ``R`` owns ``a_factors[g]`` and
    ``b_factors[g]`` (layout by :meth:`_stored_shape`); :meth:`block_pairs` views them as
    ``(blocks, R, *a)`` / ``(blocks, R, *b)``. Subclasses give the forward formulas, the MAC
    formulas and the cost-model workload.
    """

    implementations: tuple[str, ...] = ("auto", "factored", "composed")

    def __init__(self, block_shape: Shape, blocks: int, terms: Sequence[Sequence[int]],
                 bias: bool, implementation: str, device: torch.device | str | None,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        name = type(self).__name__
        implementation = implementation_name(implementation)
        if implementation not in self.implementations:
            raise FactorizationError(
                f"{name}: implementation={implementation!r} is not available; use one of "
                f"{', '.join(self.implementations)}")
        kw = {"device": device, "dtype": dtype}
        self.block_shape = tuple(int(d) for d in block_shape)
        self.blocks = int(blocks)
        self.terms = normalize_terms(name, self.block_shape, terms)
        self.term_groups = group_terms(self.terms)
        self.implementation = implementation
        self.a_factors = nn.ParameterList(
            nn.Parameter(torch.empty(self._stored_shape(r, a), **kw)) for a, r in self.term_groups)
        self.b_factors = nn.ParameterList(
            nn.Parameter(torch.empty(self._stored_shape(r, b_shape_for(self.block_shape, a)),
                                     **kw)) for a, r in self.term_groups)
        out = self.block_shape[0] * self.blocks
        self.bias = nn.Parameter(torch.empty(out, **kw)) if bias else None
        # a measured choice for "auto" (kron.planning.apply_plan), never in the state dict
        self.planned_implementation: str | None = None
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        self._workspaces: dict[tuple, torch.Tensor] = {}
        self._rules: dict[tuple, str] = {}
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def _stored_shape(self, rank: int, shape: Shape) -> tuple[int, ...]:
        """Shape of the parameter holding ``rank`` stacked factors of ``shape`` per block."""
        return (self.blocks * rank, *shape) if self.blocks > 1 else (rank, *shape)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The dense weight's shape (``nn.Linear`` / ``nn.Conv2d`` layout)."""
        return (self.block_shape[0] * self.blocks, *self.block_shape[1:])

    def block_pairs(self, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor,
                                                                          torch.Tensor]]:
        """``(a (blocks, R, *a_shape), b (blocks, R, *b_shape))`` per term group, contiguous,
        cast to ``dtype`` when given (the autocast dtype); differentiable."""
        pairs = []
        for (a_shape, rank), pa, pb in zip(self.term_groups, self.a_factors, self.b_factors):
            b_shape = b_shape_for(self.block_shape, a_shape)
            a = pa.reshape(self.blocks, rank, *a_shape)
            b = pb.reshape(self.blocks, rank, *b_shape)
            if dtype is not None:
                a, b = a.to(dtype), b.to(dtype)
            pairs.append((a.contiguous(), b.contiguous()))
        return pairs

    # -- construction -----------------------------------------------------------------------

    @property
    def fan_in(self) -> int:
        return math.prod(self.block_shape[1:])

    def reset_parameters(self) -> None:
        """Gaussian factors scaled so that the composed weight has the variance of PyTorch's
        default init, ``1 / (3 fan_in)``, split evenly over the terms:
        ``Var(W) = sum_i Var(A_i) Var(B_i)`` (docs/design.md, section 1)."""
        std = factor_std(kaiming_std(self.fan_in), n_factors=2, n_terms=len(self.terms))
        with torch.no_grad():
            for p in [*self.a_factors, *self.b_factors]:
                p.normal_(0.0, std)
        init_bias_(self.bias, self.fan_in)

    def _load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None, sweeps: int) -> None:
        """Fit every block's factors to its slice of ``weight`` (exact at full rank)."""
        fits = [fit_kronecker_sum(block, self.term_groups, sweeps=sweeps)
                for block in weight.chunk(self.blocks, dim=0)]
        with torch.no_grad():
            for g, (pa, pb) in enumerate(zip(self.a_factors, self.b_factors)):
                pa.copy_(torch.stack([f[g][0] for f in fits]).reshape(pa.shape))
                pb.copy_(torch.stack([f[g][1] for f in fits]).reshape(pb.shape))
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias)

    # -- copies -----------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """Pickling and deepcopy leave the caches and workspaces behind."""
        state = self.__dict__.copy()
        state.update(_weight_cache=None, _workspaces={}, _rules={})
        return state

    # -- composed weight --------------------------------------------------------------------

    def dense_weight(self) -> torch.Tensor:
        """The composed weight ``sum_i A_i (x) B_i`` in ``nn.Linear`` / ``nn.Conv2d`` layout,
        in the parameters' dtype (also under autocast). Term groups accumulate into one
        buffer: peak memory beyond W is one W-sized temporary
        (docs/notes/cpu_inference_memory.md)."""
        weight = None
        with _autocast_off(self.a_factors[0].device.type):
            for a, b in self.block_pairs():
                weight = kron_compose_blocks(a, b, out=weight)
        return weight

    def _cached_dense_weight(self) -> torch.Tensor:
        """``dense_weight()``, reused while no gradient reaches the factors and none of them
        has changed (the inference mode is part of the key: an inference tensor is not
        reused outside it)."""
        params = [*self.a_factors, *self.b_factors]
        records = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if tracing() or records or any(p.is_inference() for p in params):
            self._weight_cache = None
            return self.dense_weight()
        key = (torch.is_inference_mode_enabled(),
               *((p.data_ptr(), p._version, p.device, p.dtype) for p in params))
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = None
            with torch.no_grad():
                self._weight_cache = (key, self.dense_weight())
        return self._weight_cache[1]

    # -- execution --------------------------------------------------------------------------

    def records_autograd(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` builds an autograd graph (training)."""
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _fast_cpu_inference(self, x: torch.Tensor) -> bool:
        """CPU inference outside tracing: the paths that write into reused buffers."""
        return x.device.type == "cpu" and not self.records_autograd(x) and not tracing()

    def _workspace(self, x: torch.Tensor, numel: int) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements kept by this layer (per device, dtype,
        thread and inference mode), so that inference does not allocate and page-fault its
        intermediates on every call: the layer's buffers stay mapped whatever the process's
        allocator does. Never used when autograd records."""
        key = (x.device, x.dtype, threading.get_ident(), torch.is_inference_mode_enabled())
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < numel:
            self._workspaces.pop(key, None)
            buf = torch.empty(numel, device=x.device, dtype=x.dtype)
            self._workspaces[key] = buf
        return buf[:numel]

    def workload(self, input_shape: Sequence[int], device_type: str) -> cost_model.Workload:
        """What the cost model needs to know about a forward on ``input_shape``."""
        raise NotImplementedError

    def candidates(self, device_type: str) -> list[str]:
        """The implementations ``auto`` chooses between on ``device_type``."""
        return ["factored", "composed"]

    def rule_implementation(self, input_shape: Sequence[int], device_type: str,
                            training: bool) -> str:
        """What ``"auto"`` runs by the cost model for this input, device type and mode (a pure
        function of them and of the cost model's constants, memoised so that small layers do not
        pay for it on every call)."""
        shape = tuple(example_size(s) for s in input_shape)
        candidates = tuple(self.candidates(device_type))
        key = (shape, device_type, bool(training), candidates, cost_model.GENERATION)
        choice = self._rules.get(key)
        if choice is None:
            choice = cost_model.choose(self.workload(shape, device_type), candidates,
                                       device_type, training)
            self._rules[key] = choice
        return choice

    def resolved_implementation(self, x: torch.Tensor) -> str:
        """The implementation a forward on ``x`` runs: the configured one, else (``"auto"``)
        the applied plan, else the cost model's rule."""
        if self.implementation != "auto":
            return self.implementation
        if self.planned_implementation is not None:
            return self.planned_implementation
        return self.rule_implementation(x.shape, x.device.type, self.records_autograd(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_implementation(x, self.resolved_implementation(x))

    def run_implementation(self, x: torch.Tensor, implementation: str) -> torch.Tensor:
        """The forward by a given implementation (what a plan measures)."""
        kind = x.device.type
        dtype = (torch.get_autocast_dtype(kind)
                 if x.is_floating_point() and torch.is_autocast_enabled(kind) else None)
        implementation = implementation_name(implementation)
        if implementation == "composed":
            return self._forward_dense(x)
        if dtype is not None:
            x = x.to(dtype)
        if implementation == "factored":
            return self._forward_factored(x, dtype)
        if implementation == "triton" and "triton" in self.implementations:
            return self._forward_triton(x, dtype)
        raise FactorizationError(f"{type(self).__name__}: unknown implementation "
                                 f"{implementation!r}; use one of {self.implementations}")

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_factored(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        raise NotImplementedError

    def _forward_triton(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        raise NotImplementedError

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    # -- cost -------------------------------------------------------------------------------

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        raise NotImplementedError

    def group_macs(self, input_shape: Sequence[int]) -> list[int]:
        """MACs of each term group's factored forward on ``input_shape``."""
        raise NotImplementedError

    def analytic_macs(self, input_shape: Sequence[int], implementation: str | None = None,
                      device_type: str | None = None, training: bool = False) -> int:
        """Multiply-accumulates of the forward on ``input_shape`` (bias adds not counted).

        ``implementation=None`` counts the configured one, where ``"auto"`` means the applied
        plan, else the factored formula (the layer's own cost: what factoring buys).
        ``implementation="auto"`` counts what a forward would run: the plan, else the cost
        model's choice for ``device_type`` (default: the parameters' device) and
        ``training``. ``"triton"`` does the factored MACs."""
        impl = implementation_name(implementation or self.implementation)
        if impl == "auto":
            impl = self.planned_implementation
            if impl is None and implementation == "auto":
                impl = self.rule_implementation(
                    input_shape, device_type or self.a_factors[0].device.type, training)
        if impl == "composed":
            return self.dense_macs(input_shape)
        return sum(self.group_macs(input_shape))

    def extra_repr_terms(self) -> str:
        groups = ", ".join(f"{a}x{r}" if r > 1 else f"{a}" for a, r in self.term_groups)
        return f"terms=[{groups}], implementation={self.implementation!r}"
