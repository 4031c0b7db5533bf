"""The benchmark program runs end to end and writes a well-formed table (no timing asserted)."""

from __future__ import annotations

import json

from kron.bench import main


def test_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["layers", "--quick", "--device", "cpu", "--repeats", "1", "--warmup", "1",
                 "--json", str(out), "--only", "linear"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["linear 256x256 A(16, 16) R=2"]
    row = rows[0]
    assert row["params_dense"] == 256 * 256 + 256
    assert row["params_kron"] == 2 * (16 * 16 + 16 * 16) + 256
    assert row["macs_dense"] == 16 * 256 * 256
    assert row["macs_kron"] == 16 * 2 * 2 * 16 * 16 * 16
    assert row["mac_ratio"] == row["macs_dense"] / row["macs_kron"]
    assert row["auto_choice"] in ("factored", "dense")
    assert "| linear 256x256" in capsys.readouterr().out
