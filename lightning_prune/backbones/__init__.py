"""The paper's backbones: Conv4, VGG19 (batch norm) and ResNet18, for 32x32 and 64x64 inputs."""

from lightning_prune.backbones.conv4 import Conv4
from lightning_prune.backbones.resnet import ResNet18
from lightning_prune.backbones.vgg import VGG19

__all__ = ["Conv4", "ResNet18", "VGG19"]
