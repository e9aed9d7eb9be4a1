"""Conv4: the small convolutional network of the paper's experiments (4 convolutions, 3 linear layers)."""

from __future__ import annotations

from torch import Tensor, nn


class Conv4(nn.Module):
    """Conv-4 (two blocks of two 3x3 convolutions, each block followed by 2x2 max-pooling, then three linear layers).

    This is the Conv-4 of the lottery-ticket literature used by the paper. The first linear layer is sized from
    ``input_size`` so the network fits 32x32 (CIFAR10) and 64x64 (TinyImageNet) inputs.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input images.
        input_size: height (= width) of the input images; must be divisible by 4.
        width: channels of the first block (the second block has twice as many).
        hidden: width of the two hidden linear layers.
        batch_norm: add batch normalisation after each convolution (off in the original Conv-4).

    Example:
        >>> import torch
        >>> Conv4(num_classes=10)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        width: int = 64,
        hidden: int = 256,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if input_size % 4 != 0 or input_size < 4:
            raise ValueError(f"Conv4 needs an input_size divisible by 4 (two 2x2 poolings), got {input_size}.")
        if num_classes < 1 or in_channels < 1 or width < 1 or hidden < 1:
            raise ValueError("Conv4 needs num_classes, in_channels, width and hidden >= 1.")

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            return layers

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2),
        )
        flat = 2 * width * (input_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
