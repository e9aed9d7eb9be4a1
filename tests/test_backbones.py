import pytest
import torch
from torch import nn

from lightning_prune.backbones import VGG19, Conv4, ResNet18


@pytest.mark.parametrize("size, classes", [(32, 10), (64, 200)])
@pytest.mark.parametrize(
    "make",
    [
        lambda size, classes: Conv4(num_classes=classes, input_size=size, width=4, hidden=8),
        lambda size, classes: VGG19(num_classes=classes, width_multiplier=0.0625),
        lambda size, classes: ResNet18(num_classes=classes, width=4),
    ],
)
def test_output_shape(make, size, classes):
    assert make(size, classes)(torch.zeros(2, 3, size, size)).shape == (2, classes)


def test_full_size_layer_counts():
    convs = lambda m: sum(isinstance(x, nn.Conv2d) for x in m.modules())  # noqa: E731
    assert convs(Conv4()) == 4 and convs(VGG19()) == 16 and convs(ResNet18()) == 20  # 17 + 3 shortcuts
    assert sum(isinstance(x, nn.BatchNorm2d) for x in VGG19().modules()) == 16
    assert 11_000_000 < sum(p.numel() for p in ResNet18().parameters()) < 11_300_000


def test_backbones_refuse_sizes_they_cannot_build_naming_the_argument():
    with pytest.raises(ValueError, match="divisible by 4"):
        Conv4(input_size=30)
    with pytest.raises(ValueError, match="width_multiplier"):
        VGG19(width_multiplier=0)
