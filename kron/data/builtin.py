"""kron's own datasets in the registry (kron/data/registry.py): each one's config keys beyond
those every dataset has (:class:`kron.config_schema.DataConfig`), and how its config builds the
``train`` / ``test`` dataset. The values live in ``configs/data/<name>.yaml`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, NotRequired

from torch.utils.data import Dataset

from kron.config_schema import DataConfig, KwargsOf, Min

from .build import resolve_path
from .hwdb import HWDB
from .imagenet import ImageNet
from .registry import register_dataset
from .scenetext import Chars74K, ICDAR03Chars
from .svhn import SVHN
from .synthetic import ensure_synth_hwdb, ensure_synth_svhn

Cfg = Mapping[str, Any]
Transform = Callable | None


class SvhnConfig(DataConfig):
    root: str
    train_split: str  # train, extra or train+extra
    test_split: str
    verify_md5: bool  # the official checksums (false for generated files)


class SynthSvhnConfig(SvhnConfig):
    synth: Annotated[dict[str, Any], KwargsOf(ensure_synth_svhn, exclude=("root",))]


class HwdbConfig(DataConfig):
    path: str
    train_split: str
    test_split: str
    # present: draw synthetic HWDB into `path` (its classes and size: num_classes, input_size)
    synth: NotRequired[Annotated[dict[str, Any],
                                 KwargsOf(ensure_synth_hwdb, exclude=("path", "size"))]]


class Icdar03Config(DataConfig):
    root: str
    train_subdir: str
    test_subdir: str
    case_sensitive: bool


class Chars74kConfig(DataConfig):
    root: str
    case_sensitive: bool
    test_fraction: Annotated[float, Min(0)]
    split_seed: int


class ImagenetConfig(DataConfig):
    root: str


@register_dataset("svhn", SvhnConfig)
def build_svhn(c: Cfg, split: str, transform: Transform) -> Dataset:
    return SVHN(resolve_path(c["root"]), c[f"{split}_split"], transform,
                verify_md5=bool(c["verify_md5"]))


@register_dataset("synth_svhn", SynthSvhnConfig)
def build_synth_svhn(c: Cfg, split: str, transform: Transform) -> Dataset:
    ensure_synth_svhn(resolve_path(c["root"]), **c["synth"])
    return build_svhn(c, split, transform)


@register_dataset("hwdb", HwdbConfig)
def build_hwdb(c: Cfg, split: str, transform: Transform) -> Dataset:
    path = resolve_path(c["path"])
    if "synth" in c:
        ensure_synth_hwdb(path, num_classes=int(c["num_classes"]), size=int(c["input_size"]),
                          **c["synth"])
    return HWDB(path, c[f"{split}_split"], transform)


@register_dataset("icdar03", Icdar03Config)
def build_icdar03(c: Cfg, split: str, transform: Transform) -> Dataset:
    root = resolve_path(c["root"]) / c[f"{split}_subdir"]
    return ICDAR03Chars(root, bool(c["case_sensitive"]), transform)


@register_dataset("chars74k", Chars74kConfig)
def build_chars74k(c: Cfg, split: str, transform: Transform) -> Dataset:
    return Chars74K(resolve_path(c["root"]), bool(c["case_sensitive"]), split, transform,
                    float(c["test_fraction"]), int(c["split_seed"]))


@register_dataset("imagenet", ImagenetConfig)
def build_imagenet(c: Cfg, split: str, transform: Transform) -> Dataset:
    return ImageNet(resolve_path(c["root"]), "train" if split == "train" else "val", transform)
