"""``kron.bench deploy`` and ``kron.bench calibrate``: table and JSON structure, ONNX Runtime
outputs checked, calibration files that round-trip into the cost model (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from kron.bench import main
from kron.layers import KronLinear, cost_model

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(autouse=True)
def _no_machine_calibration(tmp_path, monkeypatch):
    """The entrypoints load ~/.cache/kron's calibration if present: not in tests."""
    monkeypatch.setenv("KRON_CALIBRATION_DIR", str(tmp_path / "calibration"))


def _deploy(tmp_path, *runtimes: str, batches=("1", "3")) -> tuple[dict, str]:
    out = tmp_path / "deploy.json"
    assert main(["deploy", "model.width=0.25", "--batches", *batches, "--rounds", "1",
                 "--warmup", "0", "--runtimes", *runtimes, "--json", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_deploy_table_and_onnx_check(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    record, _ = _deploy(tmp_path, "eager", "onnx")
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == ("| runtime | batch 1 dense / kron | speedup | batch 3 dense / kron | "
                        "speedup |")
    assert table[2].startswith("| eager PyTorch | ") and table[3].startswith(
        "| ONNX Runtime (exported at batch 1) | ")
    assert len(table) == 4 and all(line.count("|") == 6 for line in table)
    rows = {(r["runtime"], r["batch"]): r for r in record["rows"]}
    assert set(rows) == {(rt, b) for rt in ("eager", "onnx") for b in (1, 3)}
    for (rt, _), row in rows.items():
        assert row["dense_ms"] > 0
        assert (row["kron_ms"] is None) == (rt == "onnx" and row["kron_error"] is not None)
    # the dense net exports with a dynamic batch: ORT matched eager at every batch
    assert record["onnx_status"]["dense"] == {"1": None, "3": None}
    assert record["onnx_status"]["kron"]["1"] is None  # traced at batch 1
    assert record["input_shape"] == [1, 3, 32, 32] and record["rounds"] == 1


@pytest.mark.slow
def test_deploy_with_torch_compile(tmp_path, capsys):
    record, _ = _deploy(tmp_path, "eager", "compile", batches=("2",))  # one compile per net
    assert {r["runtime"] for r in record["rows"]} == {"eager", "compile"}
    assert all(r["dense_ms"] > 0 and r["kron_ms"] > 0 for r in record["rows"])
    assert "| torch.compile | " in capsys.readouterr().out


@pytest.fixture
def restore_cpu_constants():
    saved = cost_model.constants_for("cpu")
    yield
    cost_model.set_constants("cpu", saved)


def test_calibrate_writes_a_file_that_load_calibration_installs(tmp_path, capsys,
                                                                restore_cpu_constants):
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--device", "cpu", "--quick", "--repeats", "1", "--warmup", "0",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["format"] == "kron-cost-calibration/1" and data["device_type"] == "cpu"
    assert set(data["penalty"]) == {"linear", "conv_pointwise", "conv_spatial"}
    assert all(len(v) == 2 and min(v) > 0 for v in data["penalty"].values())
    assert data["op_overhead"] > 0 and len(data["cases"]) == 3
    assert f"wrote {out}" in capsys.readouterr().out
    installed = cost_model.load_calibration(str(out))
    assert cost_model.constants_for("cpu") is installed
    assert installed.op_overhead == data["op_overhead"]
    assert installed.penalty["linear"] == tuple(data["penalty"]["linear"])


def test_load_calibration_changes_what_auto_chooses(tmp_path, restore_cpu_constants):
    """A file with a huge linear penalty makes ``auto`` compose W; a tiny one runs factored.
    Kinds the file leaves out keep their values; a broken file is refused in one line."""
    layer = KronLinear(256, 256, [(16, 16)])
    path = tmp_path / "cal.json"
    shipped = cost_model.constants_for("cpu")
    for penalty, want in ((1e4, "composed"), (1e-3, "factored")):
        path.write_text(json.dumps({"device_type": "cpu", "op_overhead": 0.0,
                                    "penalty": {"linear": [penalty, penalty]}}))
        costs = cost_model.load_calibration(str(path))
        assert costs.penalty["conv_spatial"] == shipped.penalty["conv_spatial"]
        assert layer.rule_implementation((64, 256), "cpu", training=False) == want
    path.write_text(json.dumps({"device_type": "cpu", "penalty": {}}))
    with pytest.raises(ValueError, match="not a kron cost-model calibration"):
        cost_model.load_calibration(str(path))


def test_set_constants_returns_what_it_replaced(restore_cpu_constants):
    before = cost_model.constants_for("cpu")
    new = cost_model.DeviceCosts(1.0, {"linear": (1.0, 1.0)})
    assert cost_model.set_constants("cpu", new) is before
    assert cost_model.constants_for("cpu") is new and cost_model.constants_for("cuda") is not new


def test_calibrate_default_path_is_what_the_entrypoints_load(tmp_path, capsys,
                                                             restore_cpu_constants):
    from kron.calibrate import default_path, load_default

    assert load_default("cpu") is None  # nothing calibrated yet: shipped constants kept
    assert main(["calibrate", "--device", "cpu", "--quick", "--repeats", "1"]) == 0
    path = tmp_path / "calibration" / "cost_model_cpu.json"
    assert default_path("cpu") == path and path.is_file()
    assert load_default("cpu") == path
    assert cost_model.constants_for("cpu").op_overhead == json.loads(path.read_text())[
        "op_overhead"]
    assert f"constants from {path}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_calibrate_cuda_without_a_gpu_says_so(capsys):
    assert main(["calibrate", "--device", "cuda", "--quick"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
