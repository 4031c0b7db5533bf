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


@pytest.mark.parametrize("implementation", ["factored", "dense"])
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


@pytest.mark.parametrize("implementation", ["factored", "dense", "auto"])
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
    model = surgered_net(("factored", "dense", "factored"))
    onnx_program = torch.onnx.export(model, (torch.randn(2, *INPUT[1:]),), dynamo=True,
                                     dynamic_shapes=BATCH, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for batch in (1, 3):
        x = torch.randn(batch, *INPUT[1:])
        (out,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), eager(model, x), rtol=1e-4, atol=1e-4)
