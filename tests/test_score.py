"""The out-of-distribution score's arithmetic on its own (fmnist.ood), fast: a seeded Network fitted to 2,500 real
training images, against the textbook formulas in float64. tests/test_ood.py judges the score on a trained
model; this file checks that it is the score the module's docstring describes."""

import numpy as np
import pytest
import torch

from fmnist import data, ood, runtime
from fmnist.model import Network

COUNT = 2_500   # more than one of fit's batches of 2,000, so that its batching is checked too


@pytest.fixture   # each test fits its own: mutmut counts a fixture's calls for the first test that uses it alone
def fitted(real_data):
    torch.manual_seed(0)
    network = Network().eval()
    train, test = data.load("train", download=False), data.load("test", download=False)
    x, y = runtime.to_model_input(train.images[:COUNT]), train.labels[:COUNT].astype(np.int64)
    detector, threshold = ood.fit(network, x, y)
    return network, x, y, detector, threshold, runtime.to_model_input(test.images[:40])


def textbook(network, x, y, images):
    """The two Gaussian parts as the docstring says them, in float64, each on its scale (0 at the median of
    the training images x, 1 at their 95th percentile): (N,) for the pixels, the squared Mahalanobis distance
    from the mean of x in the PIXEL_DIRECTIONS eigen-directions of least variance of their (regularised)
    covariance; (N, 10) for conv1, the squared distance of its ReLU'd maps averaged over 8 x 8 blocks to each
    class mean under the class's own regularised covariance, plus the log-determinant of that covariance."""
    def pixel_distance(f):
        px = x.reshape(len(x), -1).astype(np.float64)
        covariance = np.cov(px.T, bias=True)
        covariance += ood.PIXEL_RIDGE * np.trace(covariance) / 784 * np.eye(784)
        values, vectors = np.linalg.eigh(covariance)
        k = ood.PIXEL_DIRECTIONS
        return ((((f.reshape(len(f), -1) - px.mean(0)) @ vectors[:, :k]) ** 2) / values[:k]).sum(1)

    def averaged_maps(f):   # (N, 54): each of conv1's 6 maps (24 x 24) after ReLU, its 3 x 3 squares' means
        with torch.inference_mode():
            maps = np.maximum(network.conv1(torch.from_numpy(f)).double().numpy(), 0)
        return maps.reshape(len(f), 6, 3, 8, 3, 8).mean((3, 5)).reshape(len(f), 54)

    def conv_distances(f):
        g_train, g = averaged_maps(x), averaged_maps(f)
        per_class = []
        for c in range(10):
            mine = g_train[y == c]
            covariance = (mine - mine.mean(0)).T @ (mine - mine.mean(0)) / len(mine)
            covariance += ood.CONV_RIDGE * np.trace(covariance) / 54 * np.eye(54)
            d = g - mine.mean(0)
            per_class.append(np.einsum("ni,ij,nj->n", d, np.linalg.inv(covariance), d)
                             + np.linalg.slogdet(covariance)[1])
        return np.stack(per_class, 1)

    def scaled(part, on_train):
        median, high = np.quantile(on_train, [0.5, 0.95])
        return (part - median) / (high - median)

    pixels = scaled(pixel_distance(images), pixel_distance(x))
    conv = scaled(conv_distances(images), conv_distances(x).min(1))
    return pixels, conv


def test_each_part_is_its_textbook_formula_on_its_scale(fitted):
    network, x, y, detector, _, images = fitted
    with torch.inference_mode():
        logits, pixels, conv, _ = (t.double().numpy() for t in detector.parts(torch.from_numpy(images)))
        own = network(torch.from_numpy(images)).double().numpy()
    expected_pixels, expected_conv = textbook(network, x, y, images)
    assert pixels.shape == (40, 1) and conv.shape == (40, 10)
    np.testing.assert_allclose(pixels[:, 0], expected_pixels, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(conv, expected_conv, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(logits, own)   # the logits are the Network's own


def test_the_score_is_the_largest_part_and_the_threshold_keeps_95_percent(fitted):
    network, x, y, detector, threshold, images = fitted
    with torch.inference_mode():
        _, pixels, conv, blank = detector.parts(torch.from_numpy(x))
        _, score = detector(torch.from_numpy(x))
    pixels, conv = pixels[:, 0].double().numpy(), conv.amin(1).double().numpy()
    for part in (pixels, conv):
        assert np.median(part) == pytest.approx(0, abs=1e-5)        # 0 at its median on the training images
        assert np.quantile(part, 0.95) == pytest.approx(1, abs=1e-5)   # 1 at their 95th percentile
    assert float(blank.max()) < float(score.min())   # no training image is blank
    np.testing.assert_allclose(score.double().numpy(), np.maximum(pixels, conv), rtol=1e-6, atol=1e-6)
    assert bool((pixels > conv).any()) and bool((conv > pixels).any())   # each part wins somewhere
    # The threshold keeps KEEP of the training images: 95% of them at or under it.
    assert threshold == pytest.approx(float(np.quantile(score.double().numpy(), ood.KEEP)), rel=1e-6)
    assert np.mean(score.numpy() <= threshold) == pytest.approx(ood.KEEP, abs=1 / COUNT)


def test_score_is_the_largest_of_the_parts_with_the_nearest_class():
    rng = np.random.default_rng(2)
    pixels, conv, blank = rng.normal(size=(50, 1)), rng.normal(size=(50, 10)), rng.normal(size=(50, 1))
    got = ood.score(torch.from_numpy(conv), torch.from_numpy(np.c_[pixels, blank]))
    np.testing.assert_array_equal(got.numpy(), np.maximum.reduce([pixels[:, 0], conv.min(1), blank[:, 0]]))


def test_the_fitted_buffers_are_float32_and_of_the_exported_shapes(fitted):
    network, x, y, detector, _, _ = fitted
    k = ood.PIXEL_DIRECTIONS
    assert {name: tuple(buffer.shape) for name, buffer in detector.named_buffers()} == {
        "pixel_project": (k + 1, 784), "pixel_shift": (k + 1,), "pixel_sum": (2, k + 1), "pixel_offset": (2,),
        "conv_averaging": (576, 9), "conv_project": (540, 54), "conv_shift": (540,), "conv_sum": (10, 540),
        "conv_offset": (10,)}
    assert all(buffer.dtype == torch.float32 for buffer in detector.buffers())
    # conv_sum adds up each class's own 54 squares, and no other class's.
    sums = detector.conv_sum.numpy()
    np.testing.assert_array_equal(sums != 0, np.kron(np.eye(10), np.ones((1, 54))) != 0)
    # pixel_sum: the pixel part sums the K directions' squares and not the ink's; the ink part the ink's alone.
    sums = detector.pixel_sum.numpy()
    assert (sums[0, :k] > 0).all() and sums[0, k] == 0
    assert (sums[1, :k] == 0).all() and sums[1, k] == -ood.INK_BLANK
    assert detector.network is network and not detector.training


def test_block_means_average_each_square_of_a_map():
    # The textbook test cannot see the squares in another order, or summed rather than averaged: the scaled
    # distances do not change under either. Here the 2 x 2 squares of a 6 x 6 map make side // block (3) and
    # block (2) differ.
    side = np.arange(36.0).reshape(6, 6)                       # a 6 x 6 map, flattened row by row
    expected = side.reshape(3, 2, 3, 2).mean((1, 3)).ravel()    # its 2 x 2 squares' means, row by row
    np.testing.assert_allclose(side.ravel() @ ood.block_means(6, 2), expected)
    maps = torch.from_numpy(np.stack([side, -side])[None]).float()   # (1, 2, 6, 6): two maps, one image
    np.testing.assert_allclose(ood.averages(maps, torch.from_numpy(ood.block_means(6, 2)).float()).numpy(),
                               [np.r_[expected, -expected]], rtol=1e-6)


def test_the_whitenings_give_mahalanobis_distances():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    covariance = a @ a.T + np.eye(6)
    w = ood.whitening(covariance)
    np.testing.assert_allclose(w @ w.T, np.linalg.inv(covariance), rtol=1e-9, atol=1e-12)
    ridged = covariance + 0.5 * np.trace(covariance) / 6 * np.eye(6)
    np.testing.assert_allclose(ood.regularised(covariance, 0.5), ridged)
    # All the directions: the full Mahalanobis distance; fewer: the ones of least variance, each whitened.
    x, mean = rng.normal(size=(5, 6)), rng.normal(size=6)
    full = ood.least_varied(covariance, 0.0, 6)
    expected = np.einsum("ni,ij,nj->n", x - mean, np.linalg.inv(covariance), x - mean)
    np.testing.assert_allclose((((x - mean) @ full) ** 2).sum(1), expected, rtol=1e-9)
    two = ood.least_varied(covariance, 0.0, 2)
    np.testing.assert_allclose(two.T @ covariance @ two, np.eye(2), atol=1e-9)
    np.testing.assert_allclose(np.sort(1 / (two ** 2).sum(0)), np.linalg.eigvalsh(covariance)[:2], rtol=1e-9)


def test_a_blank_image_scores_ink_blank_and_an_inked_one_is_not_flagged_by_its_ink(fitted):
    network, x, y, detector, threshold, images = fitted
    ink = x.astype(np.float64).reshape(len(x), -1).sum(1)
    limit = ood.INK_SHARE * ink.min()
    at_limit = np.full((1, 1, 28, 28), limit / 784, np.float32)        # exactly the limit of ink
    half = np.full((1, 1, 28, 28), limit / 2 / 784, np.float32)        # half of it
    with torch.inference_mode():
        blank = detector.parts(torch.from_numpy(np.concatenate([np.zeros_like(at_limit), half, at_limit, x])))[3]
        _, scores = detector(torch.zeros(3, 1, 28, 28))
    # INK_BLANK * (1 - (ink / limit) ** 2): INK_BLANK for none, 3/4 of it for half the limit, 0 at the limit.
    np.testing.assert_allclose(blank[:3, 0].numpy(), [ood.INK_BLANK, ood.INK_BLANK * 3 / 4, 0], atol=1e-4)
    # The faintest training image has twice the limit: its ink part is -3 INK_BLANK, the others' lower.
    assert float(blank[3:].max()) == pytest.approx(-3 * ood.INK_BLANK, abs=1e-3)
    assert scores.tolist() == [ood.INK_BLANK] * 3 and ood.INK_BLANK > threshold   # all black: flagged
