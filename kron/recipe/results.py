"""Steps 5-6 of the recipe: measure against the dense twin, and write ``results.json``.

``results.json`` (rank 0, atomic) is the run's record; the tables read it, and the W&B summary
carries the same fields. Its schema is in docs/design.md, D6 and D8.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kron import measure
from kron.fileio import atomic_write_text
from kron.recipe.checkpoint import TrainState
from kron.recipe.model import Net
from kron.recipe.setup import Job
from kron.runtime import launch_record

RESULTS_NAME = "results.json"


def git_commit() -> str | None:
    """The kron checkout's commit (for the tables' provenance), or None outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _speed(cfg: DictConfig, job: Job, model: nn.Module, dense: nn.Module,
           shape: tuple[int, int, int]) -> dict[str, Any]:
    """Latency at ``measure.batch_size`` and (when set) throughput at
    ``measure.throughput_batch_size``, in the job's compute dtype (bf16/fp16 under AMP on CUDA),
    both against the dense twin, timed as docs/design.md, D5 says."""
    m = cfg.measure
    threads = torch.get_num_threads()
    if m.threads:  # e.g. 1 on a busy machine, where spinning OpenMP threads stall
        torch.set_num_threads(int(m.threads))
    try:
        return measure.measure_speed(
            model, dense, shape, job.device, dtype=job.amp_dtype or torch.float32,
            latency_batch=m.batch_size, throughput_batch=m.throughput_batch_size,
            warmup=m.warmup, repeats=m.repeats, channels_last=job.channels_last)
    finally:
        torch.set_num_threads(threads)


def measure_against_dense(cfg: DictConfig, job: Job, net: Net, shape: tuple[int, int, int]
                          ) -> dict[str, Any]:
    """Params, MACs per image and (if ``measure.enabled``) latency of the trained net and of
    its dense twin, built fresh on the same device."""
    model = net.raw
    dense = net.build_dense().to(job.device)
    if job.channels_last:
        dense.to(memory_format=torch.channels_last)
    one = (1, *shape)
    out: dict[str, Any] = {
        "params": measure.count_params(model), "params_dense": measure.count_params(dense),
        "macs_executed": measure.count_macs(model, one),
        "macs_dense": measure.count_macs(dense, one)}
    # the surgered layers' formula count (what FlopCounterMode saw may be a dense path)
    out["macs_analytic"] = measure.surgered_macs(out["macs_dense"],
                                                 [r.as_dict() for r in net.rows])
    out["param_ratio"] = out["params"] / out["params_dense"]
    out["mac_ratio"] = out["macs_executed"] / out["macs_dense"]
    if cfg.measure.enabled:
        out.update(_speed(cfg, job, model, dense, shape))
    else:
        out.update(latency_ms=None, latency_dense_ms=None, speedup=None)
    return out


def results_record(cfg: DictConfig, job: Job, net: Net, state: TrainState,
                   measured: dict[str, Any], num_classes: int, overrides: list[str]
                   ) -> dict[str, Any]:
    """Everything ``results.json`` holds: the measurement, the final test metrics, the history,
    what surgery changed, the layer plan, and where and how the run ran."""
    final = state.history[-1] if state.history else {}
    seconds = sum(h.get("train_seconds", 0.0) for h in state.history)
    images = sum(h.get("train_images_per_s", 0.0) * h.get("train_seconds", 0.0)
                 for h in state.history)
    acc1 = final.get("test_acc1")
    return {
        **measured,
        "test_acc1": acc1, "test_err1": None if acc1 is None else 100 - acc1,
        "test_acc5": final.get("test_acc5") if num_classes > 10 else None,
        "test_loss": final.get("test_loss"),
        "train_images_per_s": images / seconds if seconds else None,
        "epochs_done": len(state.history), "history": state.history,
        "surgery": [r.as_dict() for r in net.rows], "layer_plan": net.plan,
        "world_size": job.world, **launch_record(), "device": str(job.device),
        "allocator": job.allocator,
        "notes": job.notes, "wandb_id": state.wandb_id, "run_dir": str(job.out_dir),
        "git_commit": git_commit(), "torch_version": torch.__version__,
        "config": OmegaConf.to_container(cfg, resolve=True), "overrides": overrides,
    }


def write_results(job: Job, results: dict[str, Any]) -> Path:
    """``results.json`` in the run folder (atomic), and its scalar fields printed."""
    path = job.out_dir / RESULTS_NAME
    atomic_write_text(path, json.dumps(results, indent=2, default=str))
    print(f"results: {path}")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, (dict, list))},
                     indent=1))
    return path
