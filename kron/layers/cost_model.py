"""How ``implementation="auto"`` chooses, without timing anything: a two-term cost model.

A forward on a given input is predicted to cost, in units of one multiply-accumulate (MAC) of
the dense layer's own kernel on that device,

    cost(composed) = dense MACs                       [+ composing W, when autograd records]
    cost(factored) = sum over shape groups of  penalty(kind) * group MACs
    each plus      op_overhead * (number of ops it launches)

``penalty`` says how much slower one MAC of a factored path runs than one MAC of the dense
GEMM/convolution (small GEMMs, extra passes over memory, a dilated second convolution); it
is ``1 / efficiency`` with ``efficiency = measured speedup / MAC ratio`` from ``kron.bench``.
``auto`` runs the cheapest candidate; ties go to the first candidate in order. The rule sees
only the layer's shapes, the input shape, the device type and whether autograd records, so
the same model makes the same choice in every run, on every DDP rank, in eager mode, under
``torch.compile`` and in ``torch.export`` (docs/design.md, D4).

Where the constants come from
-----------------------------
``CPU``: ``docs/bench_cpu.json`` (``python -m kron.bench layers``, torch 2.14.1, 2 threads).
Per layer kind, the penalty is the reciprocal of the geometric mean of the efficiencies of
that kind's rows, inference (``speedup_fwd / mac_ratio``) and training
(``speedup_fwdbwd / mac_ratio``):

=================  ===========================  ==========  ===========================  ========
kind               inference efficiencies       penalty     training efficiencies        penalty
=================  ===========================  ==========  ===========================  ========
linear             .39 .62 .75 .35 .67 .90      2.0         .33 .40 .42 .25 .35 .39      2.9
conv, 1x1 A        .30 .42 .48                  2.6         .16 .19 .26                  5.0
conv, spatial A    .15 .15                      6.7         .07 .07                      14
=================  ===========================  ==========  ===========================  ========

The op overhead (2e6 MACs, about 10 us at the ~170 GMAC/s the dense kernels reached there)
only matters for tiny inputs. Composing W while training (forward and backward of the GEMM in
:func:`kron.layers.decompose.kron_compose`, plus its memory passes) is charged
``(rank + 40)`` MACs per weight element and shape group; 40 is two passes over W at the
measured ~60 MAC-equivalents per element moved.

``CUDA``: the H100 bf16 figures in issue 9 (not measured in this repository yet; the lead
re-calibrates with ``kron.bench layers --device cuda``): dense cuDNN/cuBLAS at ~360 TMAC/s
and ~4 us per launch (op overhead 1e9 MACs); torch factored linear 1.0-1.6x at MAC ratio 32
(penalty 25); two-stage factored conv 0.19x at ratio 14.4 (penalty 75); the grouped-conv
formulation for 1x1 A 1.53x at ratio 14.4 (penalty 9.4); a fused Triton linear 8.4x at ratio
32 and 3.6x at ratio 8 (penalty 3). Training penalties on CUDA are the issue's targets, not
measurements (factored f+b 0.35-0.78x today: penalty 40; Triton 13; grouped conv 11).
Any device type other than ``"cpu"`` uses the CUDA constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceCosts:
    """The constants of the cost model for one device type (see the module docstring)."""

    op_overhead: float
    # kind -> (inference penalty, training penalty), in dense MACs per factored MAC
    penalty: dict[str, tuple[float, float]]
    compose_extra_per_element: float = 40.0


CPU = DeviceCosts(
    op_overhead=2e6,
    penalty={
        "linear": (2.0, 2.9),
        "conv_pointwise": (2.6, 5.0),
        "conv_spatial": (6.7, 14.0),
    },
)

# ESTIMATES, not measured in this repository (see the docstring; `python -m kron.bench
# calibrate` on the GPU measures them and cost_model.load_calibration installs the result).
CUDA = DeviceCosts(
    op_overhead=1e9,
    penalty={
        "linear": (25.0, 40.0),
        "linear_triton": (3.0, 13.0),
        "conv_pointwise": (75.0, 40.0),
        "conv_grouped": (9.4, 11.0),
        "conv_spatial": (30.0, 40.0),
    },
)


def constants_for(device_type: str) -> DeviceCosts:
    """The constants of ``device_type`` (``"cpu"``; anything else counts as an accelerator)."""
    return CPU if device_type == "cpu" else CUDA


@dataclass(frozen=True)
class GroupCost:
    """One shape group of a factored forward: its kind, its MACs and how many ops it runs."""

    kind: str
    macs: int
    ops: int


@dataclass(frozen=True)
class Workload:
    """What the cost of one forward depends on: the dense MACs, the weight size, the shape
    groups' ranks (for composing W), and each candidate's factored groups."""

    dense_macs: int
    weight_numel: int
    ranks: tuple[int, ...]
    factored: dict[str, tuple[GroupCost, ...]]  # implementation name -> its groups


def estimate(work: Workload, implementation: str, device_type: str, training: bool) -> float:
    """Predicted cost of ``implementation`` in dense MACs (comparable across candidates only)."""
    consts = constants_for(device_type)
    if implementation == "composed":
        cost = float(work.dense_macs) + consts.op_overhead
        if training:  # W is composed on every training forward (and differentiated)
            per_element = sum(r + consts.compose_extra_per_element for r in work.ranks)
            cost += per_element * work.weight_numel + consts.op_overhead * len(work.ranks)
        return cost
    groups = work.factored[implementation]
    return sum(
        consts.penalty[g.kind][1 if training else 0] * g.macs + consts.op_overhead * g.ops
        for g in groups
    )


def choose(
    work: Workload, candidates: Sequence[str], device_type: str, training: bool
) -> str:
    """The candidate with the lowest predicted cost; ties go to the earlier candidate."""
    costs = [estimate(work, c, device_type, training) for c in candidates]
    return candidates[min(range(len(candidates)), key=costs.__getitem__)]


# ----------------------------------------------------------------------------- calibration
# How many times the constants changed in this process: layers memoise their choice with it.
GENERATION = 0


def set_constants(device_type: str, costs: DeviceCosts) -> DeviceCosts:
    """Make ``costs`` the constants of ``device_type`` (``"cpu"``, else every accelerator) for
    this process; returns the constants they replace (to put back)."""
    global CPU, CUDA, GENERATION
    previous = constants_for(device_type)
    GENERATION += 1  # choices made under the old constants are stale
    if device_type == "cpu":
        CPU = costs
    else:
        CUDA = costs
    return previous


def load_calibration(path: str) -> DeviceCosts:
    """Install the constants measured by ``python -m kron.bench calibrate`` (a JSON file) for
    its device type and return them. Kinds the file does not measure keep their current
    penalty. The layers never read files: entrypoints call this explicitly."""
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    try:
        device_type = str(data["device_type"])
        current = constants_for(device_type)
        penalty = {**current.penalty, **{k: (float(v[0]), float(v[1]))
                                          for k, v in data["penalty"].items()}}
        costs = DeviceCosts(float(data["op_overhead"]), penalty,
                            float(data.get("compose_extra_per_element",
                                           current.compose_extra_per_element)))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"{path} is not a kron cost-model calibration ({err!r}); rewrite it "
                         "with python -m kron.bench calibrate") from None
    set_constants(device_type, costs)
    return costs
