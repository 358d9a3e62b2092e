"""How unlike Fashion-MNIST an image is: a score the exported model computes beside its logits.

A classifier names one of its ten classes for anything, noise included. The score says how far an image lies
from the training images, in three parts, each fitted to the 60,000 training images at export:

- the pixels: one Gaussian for all the training images, on the PIXEL_DIRECTIONS directions of the 784 pixels in
  which they vary least (the squared Mahalanobis distance from their mean, in those directions). Garments
  keep to a few shapes on a black ground; noise, flat colours, gradients, checkerboards, text and photo crops
  put ink where no garment has any. The directions of most variance, left out, are where garments differ
  from one another, and where a garment photo made another way (another enlargement filter, a blur, JPEG)
  differs from the test image it shows.
- conv1's maps, after their ReLU and before the Network's max-pool, averaged over CONV_POOL x CONV_POOL squares
  (6 filters x 3 x 3 = 54 values): one Gaussian per class, each with its own covariance (the negative
  log-likelihood, up to a constant, of the nearest class). conv1's filters find edges, and their average
  says how much edge there is in each part of the image: handwritten digits, drawn in thin lines,
  have edges where a garment is a filled shape, though they look like a garment pixel by pixel. (conv1's
  maps flag more of the digits than conv2's, and fewer garment photos made with other enlargement filters:
  `python -m bench.ood`.)
- the ink, the sum of the pixels: a blank image (all black, all white: the commonest wrong input a page or a
  client sends) lies close to the training images in the pixel Gaussian, and conv1's flags it narrowly. Every
  training image has some (the faintest 15, the median 213); the part is INK_BLANK * (1 - (ink / limit) ** 2),
  where the limit is INK_SHARE of the faintest training image's: INK_BLANK for none, 0 at the limit, and below
  0 above it, so that it flags only an image that is (nearly) blank.

Each Gaussian part is put on one scale (0 at its median on the training images, 1 at their 95th percentile),
and the score is the largest of the three. The threshold is the score that keeps KEEP of the training images;
the test images then judge it. Every part is two matrix products or three, so the score costs little beside
the Network (its cost: `python -m bench.score_cost`; what each part flags: `python -m bench.ood`).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist.model import Network

KEEP = 0.95             # the share of training images whose score is at or under the threshold
PIXEL_DIRECTIONS = 64   # the pixel part's directions of least variance (measured: 32 lost text, 128 gained little)
PIXEL_RIDGE = 1e-3      # added to the covariances' diagonals, times their mean variance: border pixels that
CONV_RIDGE = 1e-2       # are always 0, and dead ReLUs, have none (measured: 1e-3..3e-2 flag the same sets)
CONV_POOL = 8           # conv1's 24 x 24 maps averaged over 8 x 8 (`python -m bench.ood`: 6 flags the same
                        # sets; 12, only 2 x 2 squares a map, fewer digits)
BATCH = 2000            # images per pass when fitting: bounds the memory of conv1's output
INK_SHARE = 0.5         # an image with less ink than this share of the faintest training image's is blank...
INK_BLANK = 10.0        # ...and one with none scores this: far over any threshold (about 1.5)


class Detector(nn.Module):
    """The Network with its out-of-distribution score: images (N, 1, 28, 28) in; logits (N, 10), the
    Network's own, and ood_score (N,) out. Higher: less like a Fashion-MNIST image.

    Each part is written as the exported graph computes it, a few nodes each: a projection (a matrix and a
    shift; for the conv part, of conv1's maps averaged by conv_averaging), squared, then summed by a matrix
    whose entries hold the part's scale (1 / its spread) and whose offset holds the rest (its median, and the
    conv part's log-determinants)."""

    # The buffers that __init__ registers from `fitted`, by name (fit() computes them).
    pixel_project: torch.Tensor     # (K + 1, 784): the K directions of least variance, each over its deviation,
                                    # and the ink over its limit (1 / the limit for every pixel)
    pixel_shift: torch.Tensor       # (K + 1,): minus the training mean, projected; 0 for the ink
    pixel_sum: torch.Tensor         # (2, K + 1): the pixel part's scale on the K; -INK_BLANK on the ink's square
    pixel_offset: torch.Tensor      # (2,): the pixel part's; INK_BLANK
    conv_averaging: torch.Tensor    # (24 * 24, 9): block_means, the averages of each map's 8 x 8 squares
    conv_project: torch.Tensor      # (10 * 54, 54): each class's whitening, one block of 54 rows a class
    conv_shift: torch.Tensor        # (10 * 54,): minus each class's mean, whitened
    conv_sum: torch.Tensor          # (10, 10 * 54): sums each class's block, times the scale
    conv_offset: torch.Tensor       # (10,): each class's log-determinant, less the median, scaled

    def __init__(self, network: Network, fitted: dict[str, np.ndarray]):
        super().__init__()
        self.network = network
        for name, value in fitted.items():
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, conv, pixels_and_ink = self.computed(images)
        return logits, score(conv, pixels_and_ink)

    def parts(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The logits (N, 10) and the three parts, each on the common scale: the pixels (N, 1), conv1 for each
        class (N, 10; the part is the nearest class's) and the ink (N, 1)."""
        logits, conv, pixels_and_ink = self.computed(images)
        return logits, pixels_and_ink[:, :1], conv, pixels_and_ink[:, 1:]

    def computed(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The logits (N, 10), conv1's part for each class (N, 10), and the pixel and ink parts (N, 2), as the
        exported graph computes them."""
        # conv1's maps after their ReLU, then its max-pool: the tutorial's order, the same numbers as the
        # Network's (model.py), and onnxruntime fuses the ReLU into the Conv.
        conv1_maps = F.relu(self.network.conv1(images))                         # (N, 6, 24, 24)
        maps = self.network.second_convolution(F.max_pool2d(conv1_maps, kernel_size=2, stride=2))   # (N, 12, 4, 4)
        logits = self.network.head(maps.reshape(-1, 12 * 4 * 4))                # (N, 10)
        x = images.reshape(-1, 28 * 28)
        z = F.linear(x, self.pixel_project, self.pixel_shift)                   # (N, K + 1)
        pixels_and_ink = F.linear(z * z, self.pixel_sum, self.pixel_offset)     # (N, 2)
        z = F.linear(averages(conv1_maps, self.conv_averaging), self.conv_project, self.conv_shift)   # (N, 540)
        conv = F.linear(z * z, self.conv_sum, self.conv_offset)                 # (N, 10)
        return logits, conv, pixels_and_ink


def block_means(side: int, block: int) -> np.ndarray:
    """(side * side, (side // block) ** 2): the matrix that averages a side x side map, flattened row by row,
    over its block x block squares (in the same order). A matrix product, because onnxruntime's AveragePool is
    several times slower on conv1's maps (onnxruntime's profiler; bench/README.md)."""
    band = np.arange(side) // block                                     # each row's (and column's) band of squares
    square = (band[:, None] * (side // block) + band[None, :]).ravel()   # each pixel's square
    return np.eye((side // block) ** 2)[square] / block ** 2


def averages(conv1_maps: torch.Tensor, averaging: torch.Tensor) -> torch.Tensor:
    """(N, 6 * 9): conv1's maps after their ReLU (N, 6, 24, 24), each averaged over its CONV_POOL x CONV_POOL
    squares by `averaging` (block_means)."""
    return (conv1_maps.flatten(2) @ averaging).flatten(1)


def score(conv: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """(N,) the largest of the parts: conv's nearest class's (the smallest of conv, (N, 10)), or the largest of
    `others` (N, k), the pixel and ink parts side by side, as the exported graph computes them (taking them
    apart would cost it a node each)."""
    return torch.maximum(conv.amin(1), others.amax(1))


# ---- fitting, at export --------------------------------------------------------------------------

def fit(network: Network, images: np.ndarray, labels: np.ndarray) -> tuple[Detector, float]:
    """The Detector fitted to the training images (float32 (N, 1, 28, 28) in [0, 1]) and their labels, and the
    threshold: the score that KEEP of these images are at or under."""
    with torch.inference_mode():   # no autograd records: the fit only reads the Network
        network = network.eval()
        x = torch.from_numpy(images)
        pixels = images.reshape(len(images), -1).astype(np.float64)
        conv_averaging = block_means(24, CONV_POOL)                             # conv1's maps: 24 x 24
        averaging = torch.from_numpy(conv_averaging).float()                    # as the Detector holds it
        conv = torch.cat([averages(F.relu(network.conv1(x[i:i + BATCH])), averaging)
                          for i in range(0, len(x), BATCH)]).double().numpy()
        classes = np.unique(labels)

        mean = pixels.mean(0)
        directions = least_varied(np.cov(pixels.T, bias=True), PIXEL_RIDGE, PIXEL_DIRECTIONS)   # (784, K)
        conv_means = [conv[labels == c].mean(0) for c in classes]
        covariances = [regularised(np.cov(conv[labels == c].T, bias=True), CONV_RIDGE) for c in classes]
        whiten = [whitening(cov) for cov in covariances]                                    # each (54, 54)
        d = conv.shape[1]
        # The ink part rides on the pixel part's matrices: one more row, the ink over its limit, squared with
        # the others and summed into a second output, INK_BLANK * (1 - (ink / limit) ** 2). One graph node
        # fewer than a product of its own, and at batch 1 every node shows in the cost (`python -m bench.score_cost`).
        k = directions.shape[1]
        ink_limit = INK_SHARE * pixels.sum(1).min()
        pixel_sum = np.zeros((2, k + 1))
        pixel_sum[0, :k], pixel_sum[1, k] = 1, -INK_BLANK
        fitted = dict(
            conv_averaging=conv_averaging,
            pixel_project=np.vstack([directions.T, np.full((1, pixels.shape[1]), 1 / ink_limit)]),
            pixel_shift=np.r_[-mean @ directions, 0.0], pixel_sum=pixel_sum, pixel_offset=np.array([0.0, INK_BLANK]),
            conv_project=np.concatenate([w.T for w in whiten]),
            conv_shift=-np.concatenate([m @ w for m, w in zip(conv_means, whiten, strict=True)]),
            conv_sum=np.kron(np.eye(len(classes)), np.ones((1, d))),
            conv_offset=np.array([np.linalg.slogdet(cov)[1] for cov in covariances]))
        detector = Detector(network, fitted).eval()

        # Each Gaussian part on one scale: 0 at its median on the training images, 1 at their 95th percentile.
        # The scale is linear in the parts, so the parts already computed are rescaled rather than computed again.
        pixel_part, conv_part, blank = (torch.cat(p) for p in zip(
            *(detector.parts(x[i:i + BATCH])[1:] for i in range(0, len(x), BATCH)), strict=True))
        scaled = []
        for (weights, offset), values in (((detector.pixel_sum[:1], detector.pixel_offset[:1]), pixel_part),
                                          ((detector.conv_sum, detector.conv_offset), conv_part)):
            median, high = np.quantile(values.amin(1).double().numpy(), [0.5, 0.95])
            weights /= high - median
            offset.sub_(median).div_(high - median)
            scaled.append((values - median) / (high - median))
        pixels_scaled, conv_scaled = scaled
        scores = score(conv_scaled, torch.cat([pixels_scaled, blank], 1))
        return detector, float(np.quantile(scores.double().numpy(), KEEP))


def regularised(covariance: np.ndarray, ridge: float) -> np.ndarray:
    return covariance + ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))


def whitening(covariance: np.ndarray) -> np.ndarray:
    """W with W @ W.T the inverse of the covariance, so that |(x - m) @ W|^2 is the squared Mahalanobis
    distance."""
    return np.linalg.cholesky(np.linalg.inv(covariance))


def least_varied(covariance: np.ndarray, ridge: float, k: int) -> np.ndarray:
    """(D, k): the k eigenvectors of the regularised covariance with the smallest eigenvalues, each divided by
    the square root of its eigenvalue, so that |(x - m) @ it|^2 is the Mahalanobis distance in those directions."""
    values, vectors = np.linalg.eigh(regularised(covariance, ridge))   # eigenvalues in ascending order
    return vectors[:, :k] / np.sqrt(values[:k])
