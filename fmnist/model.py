"""The Network of the classic PyTorch Fashion-MNIST tutorial, and the names of its ten classes."""

import torch
import torch.nn.functional as F
from torch import nn

# Label i of Fashion-MNIST is CLASSES[i].
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class Network(nn.Module):
    """The tutorial's CNN: 33k parameters, [0, 1] pixels (N, 1, 28, 28) in, logits (N, 10) out.

    The layer names are the tutorial's, so a state_dict moves both ways between this class and
    the tutorial's own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=1, out_channels=6, kernel_size=5)
        self.conv2 = nn.Conv2d(in_channels=6, out_channels=12, kernel_size=5)
        self.fc1 = nn.Linear(in_features=12 * 4 * 4, out_features=120)
        self.fc2 = nn.Linear(in_features=120, out_features=60)
        self.out = nn.Linear(in_features=60, out_features=10)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.convolutions(t))           # (N, 10) logits, no softmax

    def convolutions(self, t: torch.Tensor) -> torch.Tensor:
        """conv1 and conv2, each with its max-pool and ReLU: (N, 1, 28, 28) in, (N, 192) out."""
        return self.feature_maps(t).reshape(-1, 12 * 4 * 4)   # (N, 192)

    def feature_maps(self, t: torch.Tensor) -> torch.Tensor:
        """convolutions() before its flattening: (N, 12, 4, 4), conv2's maps."""
        # The tutorial applies ReLU before each max-pool. Max commutes with ReLU (both keep order), so ReLU
        # after the pool gives the very same numbers, and the same gradients, with a quarter of the ReLU
        # work. What it is worth is measured by bench/test_levers.py (figures in bench/README.md).
        t = F.max_pool2d(self.conv1(t), kernel_size=2, stride=2)    # (N, 6, 12, 12)
        return self.second_convolution(F.relu(t))

    def second_convolution(self, t: torch.Tensor) -> torch.Tensor:
        """conv2 with its max-pool and ReLU: conv1's maps, pooled and after their ReLU (N, 6, 12, 12), in;
        conv2's (N, 12, 4, 4) out."""
        t = F.max_pool2d(self.conv2(t), kernel_size=2, stride=2)    # (N, 12, 4, 4)
        return F.relu(t)

    def head(self, t: torch.Tensor) -> torch.Tensor:
        """The three linear layers: (N, 192) in, (N, 10) logits out."""
        t = F.relu(self.fc1(t))                          # (N, 120)
        t = F.relu(self.fc2(t))                          # (N, 60)
        return self.out(t)                               # (N, 10) logits, no softmax
