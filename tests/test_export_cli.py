"""kron-export and kron-compress --onnx: traced at batch 1, checked in ONNX Runtime at other
batches (and sizes) before success is reported; one-line errors otherwise."""

from __future__ import annotations

import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kron import compress, export, model_source
from kron.config_compose import compose_train

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(autouse=True)
def _no_machine_calibration(tmp_path, monkeypatch):
    """The entrypoints load ~/.cache/kron's calibration if present: not in tests."""
    monkeypatch.setenv("KRON_CALIBRATION_DIR", str(tmp_path / "calibration"))


def make_run(folder, *overrides: str):
    """A run folder as training leaves it: ``.hydra/config.yaml`` and ``last.pt`` (random
    weights, BN statistics that are not the identity)."""
    cfg = compose_train(["model.width=0.25", *overrides])
    (folder / ".hydra").mkdir(parents=True)
    text = OmegaConf.to_yaml(cfg)
    (folder / ".hydra" / "config.yaml").write_text(text)
    torch.manual_seed(0)
    net, _ = model_source.build_run_net(text)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save({"model": net.state_dict(), "epoch": 1}, folder / "last.pt")
    return net.eval()


def test_tolerance_follows_the_fan_ins():
    net = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(16, 2))
    assert export.fan_ins(net) == [2 * 9, 16]
    assert export.tolerance(net) == 8 * 2.0**-24 * (1 + 18**0.5 + 4)


def test_export_dense_run_runs_at_batch_1_7_64(tmp_path, capsys):
    run = tmp_path / "run"
    net = make_run(run, "layers=dense")
    assert export.main([str(run), "--batches", "1", "7", "64"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "dynamic: batch" in out and "64x3x32x32" in out
    session = export.session_for(run / "model.onnx")
    assert session.get_inputs()[0].shape[0] not in (1, "1")  # a named, dynamic batch
    x = torch.randn(5, 3, 32, 32)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = net(x)
    torch.testing.assert_close(torch.from_numpy(got), want,
                               atol=export.tolerance(net) * float(want.abs().max()), rtol=0)


@pytest.mark.slow
def test_export_kronecker_run_runs_at_batch_1_7_64(tmp_path):
    run = tmp_path / "run"
    make_run(run)  # the default Kronecker SVHN layers
    built = model_source.build(str(run))
    result = export.export_onnx(built.model, built.input_shape, run / "model.onnx",
                                batches=(1, 7, 64))
    assert [c.shape[0] for c in result.checks] == [1, 7, 64] and all(c.ok for c in result.checks)


@pytest.mark.slow
def test_failed_check_writes_nothing_and_says_why(tmp_path, capsys):
    """Without the layers' fix the Kronecker net fails at batch 7 (or, with it, passes): in
    either case a failure leaves no file and reports one line."""
    run = tmp_path / "run"
    make_run(run)
    code = export.main([str(run), "--batches", "1", "7"])
    err = capsys.readouterr().err.strip()
    if code == 0:
        assert (run / "model.onnx").is_file()
    else:
        assert code == 1 and len(err.splitlines()) == 1 and "at input 7x3x32x32" in err
        assert not (run / "model.onnx").exists() and not list(run.glob(".model.onnx*"))


def test_check_rejects_another_net(tmp_path):
    """The checker itself: a graph exported from one net does not pass against another."""
    torch.manual_seed(0)
    a, b = nn.Linear(8, 3).eval(), nn.Linear(8, 3).eval()
    program, dynamic = export.trace(a, (1, 8), dynamic_hw=False)
    program.save(str(tmp_path / "a.onnx"))
    session = export.session_for(tmp_path / "a.onnx")
    ok = export.check(session, a, [(1, 8), (4, 8)], export.tolerance(a))
    bad = export.check(session, b, [(1, 8), (4, 8)], export.tolerance(b))
    assert dynamic == ["batch"] and all(c.ok for c in ok) and not any(c.ok for c in bad)


def test_spatial_dims_are_dynamic_when_the_net_allows(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2))
    result = export.export_onnx(net, (1, 3, 16, 16), tmp_path / "n.onnx")
    assert result.dynamic == ["batch", "height", "width"]
    assert [c.shape for c in result.checks] == [(1, 3, 16, 16), (7, 3, 16, 16), (2, 3, 48, 48)]


def test_missing_onnxruntime_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    assert export.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "pip install 'kron[deploy]'" in err and len(err.splitlines()) == 1


def test_not_a_run_folder(tmp_path, capsys):
    assert export.main([str(tmp_path)]) == 1
    assert "no last.pt" in capsys.readouterr().err


@pytest.mark.slow
def test_compress_run_folder_with_onnx(tmp_path, capsys, monkeypatch):
    """kron-compress on a dense run folder (its config's size), low-rank FC layers (convs
    left dense: the kind does not apply), exported and checked."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    make_run(run, "layers=dense")
    assert compress.main([str(run), "--kind", "lowrank", "--param-ratio", "0.2", "--out",
                          "small.pt", "--onnx"]) == 0
    out = capsys.readouterr().out
    assert "classifier.fc1" in out and "does not apply to a Conv2d" in out
    assert (tmp_path / "small.onnx").is_file() and "matches eager at 1x3x32x32" in out
    content = compress.read(tmp_path / "small.pt")
    assert content["source"]["kind"] == "run" and content["input_shape"] == [1, 3, 32, 32]
    assert export.main([str(tmp_path / "small.pt"), "--out", str(tmp_path / "again.onnx")]) == 0


@pytest.mark.slow
def test_compress_resnet18_lowrank_fc_exports_with_dynamic_size(tmp_path, capsys, monkeypatch):
    """A torchvision net with a swapped layer exports with dynamic batch, height and width
    (global pooling before the classifier) and runs at other sizes in ONNX Runtime."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fc.yaml").write_text("fc: {kind: lowrank, rank: 32}\n")
    assert compress.main(["resnet18", "--layers", "fc.yaml", "--input-size", "32", "--onnx"]) == 0
    out = capsys.readouterr().out
    assert "dynamic: batch, height, width" in out and "2x3x64x64" in out


@pytest.mark.slow
def test_compress_resnet18_kron_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert compress.main(["resnet18", "--param-ratio", "0.1", "--input-size", "32", "--onnx"]) == 0
    assert (tmp_path / "resnet18-compressed.onnx").is_file()
