"""Step 2 of the recipe: the datasets and the two loaders of this rank."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig
from torch.utils.data import DataLoader

from kron.data import build_datasets, build_loader
from kron.errors import ConfigError
from kron.recipe.setup import Job


@dataclass
class Data:
    """This rank's training and test loaders, and what the model needs to know of the data."""

    train: DataLoader
    test: DataLoader
    num_classes: int
    shape: tuple[int, int, int]  # (channels, height, width) of one input

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train)


def build_data(cfg: DictConfig, job: Job) -> Data:
    """Datasets from ``cfg.data`` and loaders from its ``loader`` options: ``batch_size`` is
    the global batch (``batch_size / world`` per process)."""
    train_set, test_set = build_datasets(cfg.data)
    common = dict(seed=int(cfg.seed), rank=job.rank, world=job.world, device=job.device)
    train = build_loader(train_set, cfg.data.loader, batch_size=cfg.batch_size // job.world,
                         train=True, **common)
    test = build_loader(test_set, cfg.data.loader, train=False,
                        batch_size=cfg.eval_batch_size or cfg.batch_size, **common)
    if len(train) == 0:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(train_set)} training "
                          "images; pick a smaller batch_size")
    size = int(cfg.data.input_size)
    return Data(train, test, int(cfg.data.num_classes), (int(cfg.data.in_channels), size, size))
