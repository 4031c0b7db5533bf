"""The recipe's arithmetic equals a plain training loop written out here.

A tiny fixed-seed run of :func:`kron.train.train` (Kronecker net, SGD with Nesterov momentum and
weight decay, cosine schedule with warm-up, dropout on) must give the same weights, bit for
bit, and the same per-epoch training loss as the textbook loop below, built from the same
library parts (model builder, surgery, datasets, loader, parameter groups) but none of the
recipe's steps. Same operations in the same order on the CPU give identical floats, so the
comparison is exact: any change to the recipe that moves a random draw, reorders an update or
changes the schedule shows up here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kron.config_compose import compose_train
from kron.data import build_datasets, build_loader, set_epoch
from kron.models import build_model_from_config
from kron.models.surgery import apply_surgery
from kron.recipe.fit import param_groups
from kron.runtime import JobSettings, job_scope
from kron.train import CKPT_NAME, train

EPOCHS = 2


def reference_fit(c: dict) -> tuple[torch.nn.Module, list[float]]:
    """Train as the config says, with nothing but torch: seed, build, swap layers, reseed, then
    per step: set the learning rate, forward, zero the grads, backward, step."""
    data, opt = c["data"], c["optimizer"]
    shape = (data["in_channels"], data["input_size"], data["input_size"])
    with job_scope(JobSettings(seed=c["seed"], deterministic=True, cuda=False, threads=1)):
        model = build_model_from_config(c["model"], data["num_classes"], *shape[:2])
        spec = {k: {**v, "implementation": c["implementation"]} for k, v in c["layers"].items()}
        apply_surgery(model, spec, (1, *shape), strict=True)
        torch.manual_seed(c["seed"])  # rank 0's own stream starts after the shared init
        train_set, _ = build_datasets(data)
        loader = build_loader(train_set, data["loader"], batch_size=c["batch_size"],
                              train=True, seed=c["seed"])
        sgd = torch.optim.SGD(param_groups(model, opt["weight_decay"], True), lr=opt["lr"],
                              momentum=opt["momentum"], nesterov=opt["nesterov"])
        warmup, total = c["scheduler"]["warmup_steps"], c["epochs"] * len(loader)
        step, epoch_losses = 0, []
        for epoch in range(c["epochs"]):
            set_epoch(loader, epoch)
            model.train()
            loss_sum = torch.zeros(())
            for x, y in loader:
                if step < warmup:
                    lr = opt["lr"] * (step + 1) / warmup
                else:
                    lr = 0.5 * opt["lr"] * (1 + math.cos(math.pi * (step - warmup) /
                                                         (total - warmup)))
                for group in sgd.param_groups:
                    group["lr"] = lr
                loss = F.cross_entropy(model(x), y)
                sgd.zero_grad(set_to_none=True)
                loss.backward()
                sgd.step()
                step += 1
                loss_sum += loss.detach()
            epoch_losses.append((loss_sum / len(loader)).item())
    return model, epoch_losses


def test_a_tiny_run_equals_the_plain_loop_bit_for_bit(tiny_data, tmp_path):
    over = [*tiny_data, f"epochs={EPOCHS}", "model.dropout=0.25", "measure.enabled=false"]
    cfg = compose_train(over)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.scheduler.name == "cosine"
    assert cfg.scheduler.min_lr_ratio == 0 and cfg.grad_clip == 0  # what the loop leaves out
    results = train(cfg, tmp_path, over)
    model, losses = reference_fit(OmegaConf.to_container(cfg, resolve=True))
    assert [h["train_loss"] for h in results["history"]] == losses
    saved = torch.load(tmp_path / CKPT_NAME, weights_only=True)["model"]
    mine = model.state_dict()
    assert saved.keys() == mine.keys()
    differ = [k for k in mine if not torch.equal(saved[k], mine[k])]
    assert not differ, f"weights differ from the plain loop's: {differ}"
