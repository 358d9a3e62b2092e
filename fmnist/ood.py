"""How unlike Fashion-MNIST an image is: a score the exported model computes beside its logits.

A classifier names one of its ten classes for anything, noise included. The score says how far an image lies
from the training images, in two places, each a Gaussian fitted to the 60,000 training images at export:

- the pixels (784 values): one mean per class and a covariance shared by the classes (Mahalanobis distance).
  It sees what no garment photo looks like: noise, flat colours, gradients, checkerboards, text, photos.
- conv2's output (192 values): one mean and one covariance per class (the negative log-likelihood, up to a
  constant). It sees shapes made of the wrong strokes: handwritten digits, which look like a garment pixel
  by pixel.

And a blank image (all black, all white: the commonest wrong input a page or a client sends) lies close to the
faintest class means in both, so a third part flags it: the ink, the sum of the squared pixels. Every training
image has some (the faintest 4.6, the median 149); the part is INK_BLANK for none, 0 at INK_SHARE of the
faintest training image's, and below 0 above it, so that it flags only an image that is (nearly) blank.

Each part is put on one scale (0 at its median on the training images, 1 at their 95th percentile), and the
score is the largest of the three. The threshold is the score that keeps 95% of the training images; the test
images then judge it. How this was chosen against the maximum softmax probability, the energy score and the
Mahalanobis distance on fc2's 60 values (the penultimate layer): `python -m bench.ood`, figures in README.md.
"""

import numpy as np
import torch
from torch import nn

from fmnist.model import Network

KEEP = 0.95             # the share of training images whose score is at or under the threshold
PIXEL_RIDGE = 1e-3      # added to the covariances' diagonals, times their mean variance: border pixels that
CONV_RIDGE = 1e-2       # are always 0, and dead ReLUs, have none (measured: 1e-3..1e-2 flag the same sets)
BATCH = 2000            # images per pass when fitting: bounds the memory of conv1's output
INK_SHARE = 0.5         # an image with less ink than this share of the faintest training image's is blank...
INK_BLANK = 10.0        # ...and one with none scores this: far over any threshold (about 1.3)


class Detector(nn.Module):
    """The Network with its out-of-distribution score: images (N, 1, 28, 28) in; logits (N, 10), the
    Network's own, and ood_score (N,) out. Higher: less like a Fashion-MNIST image."""

    # The buffers that __init__ registers from `fitted`, by name (fit() computes them).
    pixel_means: torch.Tensor
    pixel_whiten: torch.Tensor
    pixel_scale: torch.Tensor
    conv_means: torch.Tensor
    conv_whiten: torch.Tensor
    conv_logdet: torch.Tensor
    conv_scale: torch.Tensor
    ink_limit: torch.Tensor

    def __init__(self, network: Network, fitted: dict[str, np.ndarray]):
        super().__init__()
        self.network = network
        for name, value in fitted.items():
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, pixels, conv = self.parts(images)
        return logits, self.score(pixels, conv, self.blank(images))

    def score(self, pixels: torch.Tensor, conv: torch.Tensor, blank: torch.Tensor) -> torch.Tensor:
        """The two Gaussian parts, each put on the common scale, and the blank part: the largest of the three."""
        return torch.maximum(torch.maximum((pixels - self.pixel_scale[0]) / self.pixel_scale[1],
                                           (conv - self.conv_scale[0]) / self.conv_scale[1]), blank)

    def blank(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) INK_BLANK for an image with no ink, 0 at ink_limit, falling below 0 above it."""
        ink = (images * images).flatten(1).sum(1)
        return INK_BLANK * (1 - ink / self.ink_limit)

    def parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logits, and the two parts of the score, each on its own scale: (N, 10), (N,), (N,)."""
        h = self.network.convolutions(images)                                   # (N, 192)
        logits = self.network.head(h)                                           # (N, 10)
        pixels = squared_distances(images.flatten(1), self.pixel_means, self.pixel_whiten).min(1).values
        conv = (per_class_distances(h, self.conv_means, self.conv_whiten) + self.conv_logdet).min(1).values
        return logits, pixels, conv


def squared_distances(x: torch.Tensor, means: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """(N, C) squared Mahalanobis distances of x (N, D) from each of C means (C, D), with one covariance whose
    inverse is whiten @ whiten.T. Expanded as |z|^2 - 2 z.m + |m|^2, so no (N, C, D) tensor is made."""
    z, m = x @ whiten, means @ whiten
    return (z * z).sum(1, keepdim=True) - 2 * z @ m.T + (m * m).sum(1)


def per_class_distances(h: torch.Tensor, means: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """(N, C) squared Mahalanobis distances of h (N, D), each class c with its own covariance, whose inverse is
    whiten[c] @ whiten[c].T: one matrix product for all the classes at once."""
    c, d, _ = whiten.shape
    z = h @ whiten.permute(1, 0, 2).reshape(d, c * d)                           # (N, C * D)
    shift = torch.einsum("cd,cde->ce", means, whiten).reshape(c * d)
    return ((z - shift) ** 2).reshape(-1, c, d).sum(2)


# ---- fitting, at export --------------------------------------------------------------------------

def fit(network: Network, images: np.ndarray, labels: np.ndarray) -> tuple[Detector, float]:
    """The Detector fitted to the training images (float32 (N, 1, 28, 28) in [0, 1]) and their labels, and the
    threshold: the score that KEEP of these images are at or under."""
    with torch.inference_mode():   # no autograd records: the fit only reads the Network
        network = network.eval()
        x = torch.from_numpy(images)
        pixels = images.reshape(len(images), -1).astype(np.float64)
        conv = torch.cat([network.convolutions(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]).double().numpy()
        classes = np.unique(labels)

        pixel_means = np.stack([pixels[labels == c].mean(0) for c in classes])
        pixel_whiten = whitening(shared_covariance(pixels, labels, pixel_means), PIXEL_RIDGE)
        conv_means = np.stack([conv[labels == c].mean(0) for c in classes])
        covariances = [np.cov(conv[labels == c].T, bias=True) for c in classes]
        conv_whiten = np.stack([whitening(cov, CONV_RIDGE) for cov in covariances])
        conv_logdet = np.array([np.linalg.slogdet(regularised(cov, CONV_RIDGE))[1] for cov in covariances])
        fitted = dict(pixel_means=pixel_means, pixel_whiten=pixel_whiten, pixel_scale=np.array([0.0, 1.0]),
                      conv_means=conv_means, conv_whiten=conv_whiten, conv_logdet=conv_logdet,
                      conv_scale=np.array([0.0, 1.0]), ink_limit=INK_SHARE * (pixels ** 2).sum(1).min(keepdims=True))
        detector = Detector(network, fitted).eval()

        # Each part on one scale: 0 at its median on the training images, 1 at their 95th percentile.
        pixel_part, conv_part = (torch.cat(p) for p in zip(*(detector.parts(x[i:i + BATCH])[1:]
                                                            for i in range(0, len(x), BATCH)), strict=True))
        for name, values in (("pixel_scale", pixel_part), ("conv_scale", conv_part)):
            median, high = np.quantile(values.double().numpy(), [0.5, 0.95])
            getattr(detector, name).copy_(torch.tensor([median, high - median]))
        blank = detector.blank(x)
        return detector, float(np.quantile(detector.score(pixel_part, conv_part, blank).double().numpy(), KEEP))


def shared_covariance(x: np.ndarray, labels: np.ndarray, means: np.ndarray) -> np.ndarray:
    """The covariance of x around each row's own class mean, over all the classes together."""
    centred = x - means[np.searchsorted(np.unique(labels), labels)]
    return centred.T @ centred / len(x)


def regularised(covariance: np.ndarray, ridge: float) -> np.ndarray:
    return covariance + ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))


def whitening(covariance: np.ndarray, ridge: float) -> np.ndarray:
    """W with W @ W.T the inverse of the regularised covariance, so that |(x - m) @ W|^2 is the squared
    Mahalanobis distance."""
    return np.linalg.cholesky(np.linalg.inv(regularised(covariance, ridge)))
