"""The reconstructed baselines: shapes, parameter counts by formula, knobs, torchvision layout."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from kron.models import MODELS, build_model
from kron.models.common import PlainConvNet, scale_width
from kron.models.hwdb import HWDB_CONVS, HWDB_HIDDEN
from kron.models.scenetext import SCENETEXT_CONVS, SCENETEXT_HIDDEN
from kron.models.svhn import SVHN_CONVS, SVHN_HIDDEN, SVHN_STEM

PLAIN = {  # name: (convs, hidden, in_channels, input_size, classes, (stem kernel, stride))
    "svhn": (SVHN_CONVS, SVHN_HIDDEN, 3, 32, 10, SVHN_STEM),
    "scenetext": (SCENETEXT_CONVS, SCENETEXT_HIDDEN, 1, 32, 62, (3, 1)),
    "hwdb": (HWDB_CONVS, HWDB_HIDDEN, 1, 64, 3755, (3, 1)),
}


def plain_params(convs, hidden, c_in, size, classes, stem, width, norm="batch") -> int:
    """Parameter count of a PlainConvNet by formula: convs (+BN or bias) and FC layers."""
    total, c, pools = 0, c_in, stem[1] - 1
    for i, (out, pool) in enumerate(convs):
        out = scale_width(out, width)
        k2 = stem[0] ** 2 if i == 0 else 9
        total += c * out * k2 + 2 * out if norm == "batch" else c * out * k2 + out
        c, pools = out, pools + pool
    d = c * (size // 2**pools) ** 2
    for h in hidden:
        h = scale_width(h, width)
        total += d * h + h
        d = h
    return total + d * classes + classes


@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("width", [1.0, 0.25])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_plain_nets_param_count_and_forward(name, width, norm):
    convs, hidden, c_in, size, classes, stem = PLAIN[name]
    net = build_model(name, width=width, norm=norm, num_classes=classes, in_channels=c_in,
                      input_size=size)
    assert sum(p.numel() for p in net.parameters()) == plain_params(
        convs, hidden, c_in, size, classes, stem, width, norm)
    if width < 1:
        assert net(torch.randn(2, c_in, size, size)).shape == (2, classes)


def test_svhn_default_size():
    # the documented default: 14.12M parameters, almost all in convs 2-5 and fc1-fc2
    net = build_model("svhn")
    assert sum(p.numel() for p in net.parameters()) == 14_123_178
    assert [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))] == [
        "features.conv1", "features.conv2", "features.conv3", "features.conv4",
        "features.conv5", "classifier.fc1", "classifier.fc2", "classifier.out"]


def test_large_maps_doubles_resolution_keeps_classifier():
    small = build_model("svhn", width=0.25)
    large = build_model("svhn", width=0.25, large_maps=True)
    sizes = {}
    for tag, net in (("small", small), ("large", large)):
        net.features.conv3.register_forward_hook(
            lambda m, i, o, tag=tag: sizes.__setitem__(tag, o.shape[-1]))
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert sizes == {"small": 8, "large": 16}
    assert large.features.conv1.stride == (1, 1) and small.features.conv1.stride == (2, 2)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in large.parameters())


def test_alexnet_matches_torchvision_layout():
    ours = build_model("alexnet").state_dict()
    ref = torchvision.models.alexnet().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    small = build_model("alexnet", width=0.125, num_classes=7, large_maps=True)
    assert small(torch.randn(1, 3, 96, 96)).shape == (1, 7)
    assert small.features[0].stride == (2, 2)


def test_resnet_knobs():
    net = build_model("resnet", arch="resnet18", num_classes=5, in_channels=1, large_maps=True)
    assert isinstance(net.maxpool, nn.Identity) and net.fc.out_features == 5
    assert net(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match="bottleneck"):
        build_model("resnet", arch="resnet18", width=0.5)
    wide = build_model("resnet", arch="resnet50", width=0.5)
    assert wide.layer1[0].conv2.in_channels == 32


def test_unknown_model_and_bad_norm():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("lenet")
    with pytest.raises(ValueError, match="norm"):
        PlainConvNet(3, 10, 32, SVHN_CONVS, SVHN_HIDDEN, norm="layer")
    assert set(MODELS) == {"svhn", "scenetext", "hwdb", "alexnet", "resnet"}
