"""The single training entrypoint: ``python -m kron.train [group=option] [key=value ...]``.

Read top to bottom (nanoGPT style): config -> data -> model -> layer surgery -> optimiser ->
training loop with per-epoch evaluation and atomic checkpoints -> measurement against the
dense twin (params, MACs, measured latency) -> W&B + ``results.json`` in the run folder.

Data-parallel training: ``torchrun --nproc_per_node=N -m kron.train ...`` with the same config
(``batch_size`` is the global batch; NCCL on GPU, gloo on CPU). Resume: ``resume=true`` (this
run folder, else the newest earlier run with the same overrides) or ``resume=PATH``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from kron import measure
from kron.fileio import atomic_write, atomic_write_text
from kron.models import build_model_from_config
from kron.models.surgery import apply_surgery, format_table
from kron.paths import CONFIG_DIR as PACKAGE_CONFIG_DIR

CKPT_NAME = "last.pt"
#: the config tree beside the package (absolute, so the `kron-train` script finds it too)
CONFIG_DIR = str(PACKAGE_CONFIG_DIR)


# ----------------------------------------------------------------------------- helpers
def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON atomically (temp file + ``os.replace``)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def git_commit() -> str | None:
    """The kron checkout's commit (for the tables' provenance), or None outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and primitives (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    random.setstate((state["python_version"], tuple(state["python"]), None))


def get_lr(step: int, total_steps: int, base_lr: float, sched: DictConfig) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine / step decay / constant."""
    warmup = int(sched.get("warmup_steps", 0))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if sched.name == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        floor = base_lr * float(sched.get("min_lr_ratio", 0.0))
        return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))
    if sched.name == "step":
        drops = sum(step >= int(m * total_steps) for m in sched.milestones)
        return base_lr * float(sched.gamma) ** drops
    if sched.name == "constant":
        return base_lr
    raise ValueError(f"unknown scheduler.name {sched.name!r}; use cosine, step or constant")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp_ctx, num_classes,
             channels_last: bool, world: int) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean loss over this rank's shard, summed over ranks."""
    model.eval()
    k = min(5, num_classes)
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, topk, loss sum
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_ctx:
            logits = model(x)
        topk = logits.float().topk(k, dim=1).indices
        hit = topk == y[:, None]
        stats += torch.tensor([len(y), hit[:, 0].sum().item(), hit.any(1).sum().item(),
                               F.cross_entropy(logits.float(), y, reduction="sum").item()],
                              dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(stats)
    n, top1, topk_, loss = stats.tolist()
    model.train()
    return {"acc1": 100 * top1 / max(n, 1), "acc5": 100 * topk_ / max(n, 1),
            "loss": loss / max(n, 1)}


def find_resume(resume: Any, out_dir: Path, overrides: list[str]) -> Path | None:
    """The checkpoint to resume from: an explicit file/folder, or with ``resume=true`` this run's
    folder, else the newest earlier run folder (two levels up: any day's runs, or this sweep)
    with the same overrides that has a checkpoint."""
    if resume in (None, False, "false", "False", ""):
        return None
    if resume not in (True, "true", "True"):
        p = Path(hydra.utils.to_absolute_path(str(resume)))
        p = p / CKPT_NAME if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"resume={resume}: no checkpoint at {p}")
        return p
    if (out_dir / CKPT_NAME).is_file():
        return out_dir / CKPT_NAME

    def key(ov: list[str]) -> list[str]:
        return sorted(o for o in ov if not o.startswith(("resume=", "hydra.")))

    want = key(overrides)  # search outputs/runs/*/* (any day), or this sweep's folder
    for run in sorted(out_dir.parents[1].rglob(CKPT_NAME), key=lambda p: p.stat().st_mtime,
                      reverse=True):
        ov = run.parent / ".hydra" / "overrides.yaml"
        if run.parent != out_dir and ov.is_file() and key(list(OmegaConf.load(ov))) == want:
            return run
    print(f"resume=true: no earlier checkpoint with the same overrides under {out_dir.parent}; "
          "starting fresh")
    return None


# ----------------------------------------------------------------------------- the run
def train(cfg: DictConfig, out_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """Train, evaluate and measure one run as ``cfg`` says; write everything to ``out_dir``.

    Returns the results dict (also written to ``out_dir/results.json`` on rank 0).
    """
    out_dir, overrides = Path(out_dir), list(overrides or [])
    # -- distributed setup (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK) ----------------------
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        shared = [str(out_dir)]
        dist.broadcast_object_list(shared, src=0)  # every rank writes into rank 0's folder
        if rank > 0 and Path(shared[0]) != out_dir and out_dir.is_dir() and {
                p.name for p in out_dir.iterdir()} <= {".hydra", "train.log"}:
            shutil.rmtree(out_dir, ignore_errors=True)  # this rank's own, unused Hydra folder
        out_dir = Path(shared[0])
    else:
        rank, world, local_rank = 0, 1, 0
    master = rank == 0
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must divide by the {world} processes")

    # -- determinism -----------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = use_cuda
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = use_cuda
    amp_dtype = getattr(torch, cfg.amp_dtype)
    amp_ctx = (torch.autocast("cuda", dtype=amp_dtype) if use_cuda and cfg.amp else nullcontext())
    fp16 = use_cuda and cfg.amp and amp_dtype == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    channels_last = bool(use_cuda if cfg.channels_last == "auto" else cfg.channels_last)

    # -- data ------------------------------------------------------------------------------
    from kron.data import build_datasets

    train_set, test_set = build_datasets(cfg.data)
    num_classes, in_ch, size = int(cfg.data.num_classes), int(cfg.data.in_channels), \
        int(cfg.data.input_size)
    loader_cfg = cfg.data.get("loader", {})
    workers = int(loader_cfg.get("num_workers", 0))
    pin = loader_cfg.get("pin_memory", "auto")
    pin = use_cuda if pin == "auto" else bool(pin)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed)
    loader_gen = torch.Generator()  # re-seeded each epoch: worker seeds survive a resume
    # workers are not persistent: their RNG must restart from the epoch's seed after a resume
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler,
                              num_workers=workers, pin_memory=pin, drop_last=True,
                              generator=loader_gen)
    test_loader = DataLoader(Subset(test_set, range(rank, len(test_set), world)),
                             batch_size=cfg.get("eval_batch_size") or cfg.batch_size,
                             num_workers=workers, pin_memory=pin)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(train_set)} training "
                         "images")
    total_steps = cfg.epochs * steps_per_epoch

    # -- model, then layer surgery ---------------------------------------------------------
    def build_dense() -> nn.Module:
        return build_model_from_config(cfg.model, num_classes, in_ch, size)

    model = build_dense()
    if cfg.get("init_from"):  # trained dense baseline to fit `init: dense` layers from
        src = Path(hydra.utils.to_absolute_path(str(cfg.init_from)))
        src = src / CKPT_NAME if src.is_dir() else src
        model.load_state_dict(torch.load(src, map_location="cpu", weights_only=True)["model"])
    layers_spec = OmegaConf.to_container(cfg.layers, resolve=True) if cfg.layers else {}
    if cfg.get("implementation"):  # one implementation for every Kronecker layer
        for entry in layers_spec.values():
            if entry.get("kind") == "kron":
                entry["implementation"] = cfg.implementation
    rows = apply_surgery(model, layers_spec, (1, in_ch, size, size))
    table = format_table(rows) if rows else "(no layers swapped: dense baseline)"
    if master:
        print(table)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model  # the unwrapped module: checkpoints and measurement use it
    if ddp and use_cuda and cfg.get("sync_bn", True):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if use_cuda else None)

    optimizer = hydra.utils.instantiate(cfg.optimizer)(raw_model.parameters())
    base_lr = float(cfg.optimizer.lr)

    # -- resume ----------------------------------------------------------------------------
    start_epoch, step, history, wandb_id = 0, 0, [], None
    ckpt_path = find_resume(cfg.resume, out_dir, overrides)
    if ckpt_path is not None:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
        wandb_id = ckpt.get("wandb_id")
        set_rng_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])
        if master:
            print(f"resumed from {ckpt_path} at epoch {start_epoch}")

    # -- logging ---------------------------------------------------------------------------
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run = None
    if master and cfg.wandb.mode != "disabled":
        import wandb

        run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.get("entity"),
                         group=cfg.wandb.get("group"), name=cfg.wandb.get("name"),
                         tags=list(cfg.wandb.get("tags") or []), mode=cfg.wandb.mode,
                         dir=str(out_dir), config=resolved, id=wandb_id, resume="allow")
        wandb_id = run.id
        if rows:
            run.log({"surgery": wandb.Table(columns=list(rows[0].as_dict()),
                                            data=[list(r.as_dict().values()) for r in rows])},
                    commit=False)

    try:
        # -- training loop -------------------------------------------------------------------
        model.train()
        train_time, train_images = 0.0, 0
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            loader_gen.manual_seed(cfg.seed * 100_003 + epoch)
            t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not (master and cfg.progress), dynamic_ncols=True)
            for x, y in bar:
                lr = get_lr(step, total_steps, base_lr, cfg.scheduler)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with amp_ctx:
                    loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                seen += len(y) * world
                loss_sum += loss.detach()
                if step % cfg.log_every == 0:
                    ips = seen / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
            if use_cuda:
                torch.cuda.synchronize()
            epoch_time = time.perf_counter() - t0
            train_time, train_images = train_time + epoch_time, train_images + seen
            train_loss = loss_sum.item() / steps_per_epoch
            if ddp:
                t = torch.tensor([train_loss], device=device)
                dist.all_reduce(t)
                train_loss = t.item() / world
            last = epoch + 1 == cfg.epochs
            eval_model = model.module if ddp else model  # no DDP sync: shards may differ
            ev = {}
            if last or (epoch + 1) % cfg.eval_every == 0:
                ev = evaluate(eval_model, test_loader, device, amp_ctx, num_classes,
                              channels_last, world)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "lr": lr,
                      "train_images_per_s": seen / epoch_time,
                      **{f"test_{k}": v for k, v in ev.items()}}
            history.append(record)
            if master:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in record.items()), flush=True)
                if run is not None:
                    run.log(record, step=epoch + 1)
            # -- atomic checkpoint (tensors and primitive containers only) ------------------
            states = [rng_state()]
            if ddp:
                states = [None] * world
                dist.all_gather_object(states, rng_state())
            if master:
                ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                        "epoch": epoch + 1, "step": step, "history": history, "rng": states,
                        "wandb_id": wandb_id, "config": OmegaConf.to_yaml(cfg, resolve=True)}
                atomic_write(out_dir / CKPT_NAME, lambda t, c=ckpt: torch.save(c, t))
            if ddp:
                dist.barrier()
            if cfg.get("stop_after_epochs") and epoch + 1 >= cfg.stop_after_epochs:
                if master:
                    print(f"stop_after_epochs={cfg.stop_after_epochs}: stopping (as if killed)")
                return {}

        # -- final evaluation and measurement (rank 0) ---------------------------------------
        final = history[-1] if history else {}
        results: dict[str, Any] = {}
        if master:
            results = measure_run(cfg, raw_model, build_dense, (in_ch, size), device,
                                  channels_last, rows)
            ips = (train_images / train_time if train_time else
                   final.get("train_images_per_s", float("nan")))
            results.update({
                "test_acc1": final.get("test_acc1"), "test_err1": 100 - final.get("test_acc1", 0),
                "test_acc5": final.get("test_acc5") if num_classes > 10 else None,
                "test_loss": final.get("test_loss"), "train_images_per_s": ips,
                "epochs_done": len(history), "history": history,
                "surgery": [r.as_dict() for r in rows], "world_size": world,
                "wandb_id": wandb_id, "run_dir": str(out_dir), "git_commit": git_commit(),
                "torch_version": torch.__version__,
                "config": resolved, "overrides": overrides,
            })
            write_json(out_dir / "results.json", results)
            print(f"results: {out_dir / 'results.json'}")
            print(json.dumps({k: v for k, v in results.items() if not isinstance(v, (dict, list))},
                             indent=1))
            if run is not None:
                run.summary.update({k: v for k, v in results.items()
                                    if isinstance(v, (int, float)) and v is not None})
        if ddp:
            dist.barrier()
        return results
    finally:
        if run is not None:
            run.finish()
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def measure_run(cfg: DictConfig, model: nn.Module, build_dense, chw: tuple[int, int],
                device: torch.device, channels_last: bool, rows: list) -> dict[str, Any]:
    """Params, MACs (per image) and measured latency of ``model`` and its dense twin."""
    in_ch, size = chw
    dense = build_dense().to(device)
    if channels_last:
        dense.to(memory_format=torch.channels_last)
    one = (1, in_ch, size, size)
    out = {"params": measure.count_params(model), "params_dense": measure.count_params(dense),
           "macs": measure.count_macs(model, one), "macs_dense": measure.count_macs(dense, one)}
    # formula count of the factored layers (what FlopCounterMode saw may be a dense path)
    out["macs_analytic"] = out["macs_dense"] - sum(r.macs_before - r.macs_after for r in rows)
    out["param_ratio"] = out["params"] / out["params_dense"]
    out["mac_ratio"] = out["macs"] / out["macs_dense"]
    m = cfg.measure
    if m.enabled:
        x = torch.randn(m.batch_size, in_ch, size, size, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        threads = torch.get_num_threads()
        if m.get("threads"):  # e.g. 1 on a busy machine, where spinning OpenMP threads stall
            torch.set_num_threads(int(m.threads))
        try:
            lat = measure.measure_latency({"model": model, "dense": dense}, x,
                                          warmup=m.warmup, repeats=m.repeats)
        finally:
            latency_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        out.update(latency_ms=lat["model"], latency_dense_ms=lat["dense"],
                   speedup=measure.speedup(lat["model"], lat["dense"]),
                   latency_batch_size=m.batch_size, latency_device=str(device),
                   latency_threads=latency_threads)
    else:
        out.update(latency_ms=None, latency_dense_ms=None, speedup=None)
    return out


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry: the run folder and overrides come from Hydra; returns test top-1."""
    hc = HydraConfig.get()
    results = train(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    return results.get("test_acc1")


if __name__ == "__main__":
    # Call the copy imported under the package's name: launchers that pickle the task function
    # (joblib, submitit) then pickle it by reference, not by value from __main__ with its globals.
    from kron.train import main as package_main

    package_main()
