"""VGG19 with batch normalisation, in the CIFAR form used by pruning papers (one linear classifier)."""

from __future__ import annotations

from torch import Tensor, nn

_VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)


class VGG19(nn.Module):
    """VGG19-BN for small images: 16 3x3 convolutions with batch norm, global average pooling, one linear layer.

    Works for any input size of at least 16x16 (four 2x2 poolings), so 32x32 CIFAR10 and 64x64 TinyImageNet alike.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input images.
        width_multiplier: scales every layer's channels (1.0 is the standard VGG19; smaller for quick tests).

    Example:
        >>> import torch
        >>> VGG19(num_classes=10, width_multiplier=0.125)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> None:
        super().__init__()
        if width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}.")
        layers: list[nn.Module] = []
        cin = in_channels
        for item in _VGG19:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            cout = max(1, int(round(int(item) * width_multiplier)))
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
