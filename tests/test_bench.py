"""The benchmark program end to end: its counts against hand-computed numbers, its memory
figures against known tensor sizes, its table and control line (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from kron.bench import control_summary, conv_case, format_table, main, paper_cases, run_case


def run_bench(tmp_path, *extra: str) -> list[dict]:
    out = tmp_path / "bench.json"
    assert main(["layers", "--quick", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                 "--json", str(out), "--only", "linear", *extra]) == 0
    return json.loads(out.read_text())["rows"]


def test_bench_quick_linear_counts_and_memory(tmp_path, capsys):
    (row,) = run_bench(tmp_path)
    assert row["case"] == "linear 256x256 A(16, 16) R=2" and row["dtype"] == "float32"
    assert row["params_dense"] == 256 * 256 + 256
    assert row["params_kron"] == 2 * (16 * 16 + 16 * 16) + 256
    # batch 16; each term costs X B^T then A T: two 16x16x16 matmuls per sample
    assert row["macs_dense"] == 16 * 256 * 256
    assert row["macs_kron"] == 16 * 2 * 2 * 16 * 16 * 16
    assert row["mac_ratio"] == 4.0
    # memory: a (16, 256) float32 output; nn.Linear needs nothing beyond it on the CPU
    assert row["output_bytes"] == row["peak_dense_bytes"] == 16 * 256 * 4
    assert row["peak_factored_bytes"] >= row["output_bytes"]
    assert row["weight_bytes"] == 256 * 256 * 4
    assert row["compose_peak_bytes"] >= row["weight_bytes"]
    assert row["compose_peak_ratio"] == row["compose_peak_bytes"] / (256 * 256 * 4)
    assert {row["auto_choice"], row["auto_choice_train"]} <= {"factored", "composed"}
    assert "fwd_triton_ms" not in row and row["speedup_fwd_triton"] is None  # CUDA only
    for key in ("fwd_dense_copy_ms", "control_fwd", "control_fwdbwd", "auto_vs_best"):
        assert row[key] > 0
    out = capsys.readouterr().out
    assert out.startswith("allocator: ")
    assert "| linear 256x256" in out and "control (dense vs an identical copy): forward" in out
    assert "fwd triton" not in out  # no Triton candidate on the CPU: its columns are left out


def test_bench_measures_in_the_asked_dtype(tmp_path):
    (row,) = run_bench(tmp_path, "--dtype", "bfloat16")
    assert row["dtype"] == "bfloat16"
    assert row["output_bytes"] == 16 * 256 * 2  # bf16 output
    assert row["weight_bytes"] == 256 * 256 * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_bench_cuda_without_a_gpu_says_so(capsys):
    assert main(["layers", "--device", "cuda", "--quick"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_control_summary_names_the_noisy_rows():
    rows = [{"case": "quiet", "control_fwd": 1.01, "control_fwdbwd": 0.99},
            {"case": "noisy", "control_fwd": 1.10, "control_fwdbwd": 1.0}]
    line = control_summary(rows)
    assert line == ("control (dense vs an identical copy): forward 1.01-1.10, off by more than "
                    "0.03 in: noisy. forward+backward 0.99-1.00, all within 1.00 +- 0.03")


def test_format_table_leaves_out_columns_no_row_has():
    rows = [{"case": "a", "batch": 2, "fwd_triton_ms": None, "compose_peak_ratio": 2.0,
             "peak_factored_bytes": 3 * 2**20}]
    table = format_table(rows)
    assert table.splitlines()[0].split("|")[1:-1] == [
        " case ", " N ", " peak K MiB ", " compose peak/W "]
    assert table.splitlines()[2] == "| a    | 2 | 3.00       | 2.00           |"


def test_conv_case_as_run_on_cuda_channels_last_runs_on_the_cpu():
    """The CUDA rows of conv layers run channels_last; the same row runs here, counted right."""
    row = run_case(conv_case(32, 3, (4, 4, 1, 1), 1, 8, 2, channels_last=True),
                   torch.device("cpu"), repeats=1, warmup=0)
    assert row["channels_last"]
    for device, expected in (("cuda", True), ("cpu", False)):
        assert {c.channels_last for c in paper_cases(device) if c.name.startswith("conv")} == {
            expected}
    assert row["macs_dense"] == 2 * 32 * 32 * 9 * 8 * 8  # N * out * in * k^2 * H * W
    assert row["output_bytes"] == 2 * 32 * 8 * 8 * 4
