"""W&B offline runs read like ``wandb.Api().runs()``, without a server (``render --wandb DIR``).

An offline run (``wandb/offline-run-*/run-<id>.wandb``) is W&B's transaction log: a 7-byte
header (``:W&B``, a magic, a version), then LevelDB log records (32 KiB blocks; each chunk a
4-byte checksum, 2-byte little-endian length and 1-byte type: full, first, middle, last)
carrying ``wandb.proto.wandb_internal_pb2.Record`` messages. Replaying the ``run`` (config),
``summary`` and ``exit`` records gives what the W&B API would show after ``wandb sync``: the
config, the summary, and the state (finished, failed: non-zero exit, running: no exit record,
e.g. killed). Checksums are not verified; a torn tail record ends the replay.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b":W&B"
HEADER = 7
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[bytes]:
    """The payloads of every complete record of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path}: not a W&B transaction log (no {MAGIC!r} header)")
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:
            break  # torn write at the end
        pos += 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def _set(target: dict[str, Any], item: Any) -> None:
    """Apply one config/summary update item (``key`` or ``nested_key`` path, JSON value)."""
    path = list(item.nested_key) or [item.key]
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """The fields of ``wandb.apis.public.Run`` that ``collect_wandb`` reads."""

    id: str
    name: str
    state: str
    created_at: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    project: str = ""


def read_run(path: str | Path) -> OfflineRun:
    """Replay one ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_id, name, project, state = "", "", "", "running"
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for payload in records(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id or run_id
            name = rec.run.display_name or name
            project = rec.run.project or project
            for item in rec.run.config.update:
                _set(config, item)
        elif kind == "config":
            for item in rec.config.update:
                _set(config, item)
        elif kind == "summary":
            for item in rec.summary.update:
                _set(summary, item)
        elif kind == "exit":
            state = "finished" if rec.exit.exit_code == 0 else "failed"
    folder = Path(path).parent.name  # offline-run-YYYYMMDD_HHMMSS-<id>
    created = folder.split("-")[2] if folder.count("-") >= 3 else ""
    config.pop("_wandb", None)
    return OfflineRun(run_id, name, state, created, config, summary, project)


class OfflineRuns:
    """``runs(project)`` over every offline run found under ``root`` (recursively)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"no folder {self.root} to read W&B offline runs from")

    def runs(self, project: str | None = None) -> list[OfflineRun]:
        """The runs, those of ``project`` only when given (``entity/project`` or ``project``)."""
        want = None if not project else project.split("/")[-1]
        found = [read_run(p) for p in sorted(self.root.rglob("offline-run-*/run-*.wandb"))]
        return [r for r in found if want is None or r.project == want]
