"""A surgered net as deployment tools see it: ``torch.export``, ``torch.onnx.export(...,
dynamo=True)`` and ``channels_last``.

A small SVHN net with every kind of swapped layer (Kronecker conv and FC, low-rank FC,
separable, CP and Tucker-2 convs) exports with a dynamic batch dimension; the exported program
and onnxruntime give the eager model's outputs, and so does the net in channels_last.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from kron.models import build_model
from kron.models.surgery import apply_surgery

INPUT = (1, 3, 32, 32)
BATCH = {"x": {0: Dim("batch", min=1, max=1024)}}


def surgered_net(implementations: tuple[str, str, str]) -> torch.nn.Module:
    """SVHN at quarter width with all six kinds of swapped layer; ``implementations`` are the
    Kronecker layers' (conv3, fc1, out), in eval mode."""
    conv, fc, out = implementations
    torch.manual_seed(0)
    model = build_model("svhn", width=0.25)
    spec = {
        "features.conv2": {"kind": "separable", "rank": 4},
        "features.conv3": {"kind": "kron", "terms": [(8, 8, 1, 1), (4, 4, 3, 1)],
                           "implementation": conv},
        "features.conv4": {"kind": "cp", "rank": 8},
        "features.conv5": {"kind": "tucker", "ranks": [8, 8]},
        "classifier.fc1": {"kind": "kron", "terms": [(16, 32), (8, 8), (8, 8)],
                           "implementation": fc},
        "classifier.fc2": {"kind": "lowrank", "rank": 16},
        "classifier.out": {"kind": "kron", "terms": [(2, 8)], "implementation": out},
    }
    rows = apply_surgery(model, spec, INPUT)
    assert [row.kind for row in rows] == ["separable", "kron", "cp", "tucker", "kron", "lowrank",
                                          "kron"]
    with torch.no_grad():  # BN statistics that are not the identity, so that they count
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("implementation", ["factored", "composed"])
def test_torch_export_with_dynamic_batch(implementation):
    model = surgered_net((implementation,) * 3)
    program = torch.export.export(model, (torch.randn(2, *INPUT[1:]),), dynamic_shapes=BATCH)
    exported = program.module()
    for batch in (1, 5):
        x = torch.randn(batch, *INPUT[1:])
        torch.testing.assert_close(eager(exported, x), eager(model, x), rtol=1e-5, atol=1e-6)


def test_torch_export_auto_at_a_fixed_batch():
    """``auto`` decides by a deterministic rule, so export traces the branch eager runs."""
    model = surgered_net(("auto",) * 3)
    x = torch.randn(2, *INPUT[1:])
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(eager(program.module(), x), eager(model, x), rtol=1e-5, atol=1e-6)


def test_torch_export_auto_with_dynamic_batch():
    model = surgered_net(("auto",) * 3)
    program = torch.export.export(model, (torch.randn(2, *INPUT[1:]),), dynamic_shapes=BATCH)
    x = torch.randn(3, *INPUT[1:])
    torch.testing.assert_close(eager(program.module(), x), eager(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["factored", "composed", "auto"])
def test_channels_last_net_gives_the_same_outputs(implementation):
    model = surgered_net((implementation,) * 3)
    x = torch.randn(3, *INPUT[1:])
    want = eager(model, x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(eager(model, x.to(memory_format=torch.channels_last)), want,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_onnx_export_runs_in_onnxruntime():
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = surgered_net(("factored", "composed", "factored"))
    onnx_program = torch.onnx.export(model, (torch.randn(2, *INPUT[1:]),), dynamo=True,
                                     dynamic_shapes=BATCH, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for batch in (1, 3):
        x = torch.randn(batch, *INPUT[1:])
        (out,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), eager(model, x), rtol=1e-4, atol=1e-4)


class KronNet(torch.nn.Module):
    """Kronecker layers only: pointwise-A, spatial-A and grouped convs, and a KronLinear, all
    factored (the paths whose batched products once fixed the exported batch)."""

    def __init__(self, head: bool) -> None:
        super().__init__()
        from kron.layers import KronConv2d, KronLinear

        torch.manual_seed(0)
        self.convs = torch.nn.Sequential(
            KronConv2d(4, 8, 3, [(2, 2, 1, 1), (2, 1, 3, 1)], padding=1,
                       implementation="factored"),
            torch.nn.ReLU(),
            KronConv2d(8, 8, 3, [(2, 2, 1, 1)], stride=2, padding="valid", groups=2,
                       padding_mode="reflect", implementation="factored"),
        )
        self.head = KronLinear(8 * 3 * 3, 10, [(2, 8), (2, 8)], implementation="factored") \
            if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs(x)
        return y if self.head is None else self.head(y.flatten(1))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dynamic_hw", [False, True])
def test_kron_layers_exported_at_batch_1_run_at_any_batch(dynamic_hw):
    """Traced at batch 1 with a dynamic batch (and, without the flattening head, dynamic H
    and W), the ONNX graph runs in onnxruntime at batch 1, 7 and 64. Tolerance: float32, three
    layers, sums of at most 72 products each: 1e-4 relative is far above rounding."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = KronNet(head=not dynamic_hw).eval()
    dims = {0: Dim("batch", min=1, max=1024)}
    if dynamic_hw:
        dims |= {2: Dim("h", min=5, max=64), 3: Dim("w", min=5, max=64)}
    program = torch.onnx.export(model, (torch.randn(1, 4, 7, 7),), dynamo=True,
                                dynamic_shapes={"x": dims}, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for batch, hw in ((1, 7), (7, 7), (64, 7), *(((3, 12), (2, 9)) if dynamic_hw else ())):
        x = torch.randn(batch, 4, hw, hw)
        (out,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), eager(model, x), rtol=1e-4, atol=1e-4)
