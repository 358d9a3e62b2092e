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
    """The two parts of the score, each before its scaling, as the docstring says them: the smallest squared
    Mahalanobis distance of the pixels to a class mean under the shared covariance; and over the classes, the
    smallest squared distance of conv2's output to the class mean under the class's own covariance plus the
    log-determinant of that covariance."""
    px, flat = x.reshape(len(x), -1).astype(np.float64), images.reshape(len(images), -1).astype(np.float64)
    means = np.stack([px[y == c].mean(0) for c in range(10)])
    centred = px - means[y]
    shared = centred.T @ centred / len(px)
    shared += ood.PIXEL_RIDGE * np.trace(shared) / 784 * np.eye(784)
    precision = np.linalg.inv(shared)
    pixels = np.min([np.einsum("ni,ij,nj->n", flat - m, precision, flat - m) for m in means], axis=0)
    with torch.inference_mode():
        h_train = network.convolutions(torch.from_numpy(x)).double().numpy()
        h = network.convolutions(torch.from_numpy(images)).double().numpy()
    per_class = []
    for c in range(10):
        mine = h_train[y == c]
        covariance = (mine - mine.mean(0)).T @ (mine - mine.mean(0)) / len(mine)
        covariance += ood.CONV_RIDGE * np.trace(covariance) / 192 * np.eye(192)
        d = h - mine.mean(0)
        per_class.append(np.einsum("ni,ij,nj->n", d, np.linalg.inv(covariance), d) + np.linalg.slogdet(covariance)[1])
    return pixels, np.min(per_class, axis=0)


def test_each_part_is_its_textbook_formula(fitted):
    network, x, y, detector, _, images = fitted
    with torch.inference_mode():
        logits, pixels, conv = (t.double().numpy() for t in detector.parts(torch.from_numpy(images)))
        own = network(torch.from_numpy(images)).double().numpy()
    expected_pixels, expected_conv = textbook(network, x, y, images)
    np.testing.assert_allclose(pixels, expected_pixels, rtol=1e-3)
    np.testing.assert_allclose(conv, expected_conv, rtol=1e-3, atol=1e-2)
    np.testing.assert_array_equal(logits, own)   # the logits are the Network's own


def test_each_part_is_put_on_one_scale_by_the_training_images_and_the_score_is_the_larger(fitted):
    network, x, y, detector, threshold, images = fitted
    with torch.inference_mode():
        _, pixels, conv = detector.parts(torch.from_numpy(x))
        _, score = detector(torch.from_numpy(x))
    for part, (offset, unit) in ((pixels, detector.pixel_scale), (conv, detector.conv_scale)):
        scaled = ((part - offset) / unit).double().numpy()
        assert np.median(scaled) == pytest.approx(0, abs=1e-6)       # 0 at its median on the training images
        assert np.quantile(scaled, 0.95) == pytest.approx(1, abs=1e-6)   # 1 at their 95th percentile
    expected = torch.maximum((pixels - detector.pixel_scale[0]) / detector.pixel_scale[1],
                             (conv - detector.conv_scale[0]) / detector.conv_scale[1])
    torch.testing.assert_close(score, expected, rtol=0, atol=0)   # no training image is blank
    assert bool((score > (pixels - detector.pixel_scale[0]) / detector.pixel_scale[1]).any())   # each part
    assert bool((score > (conv - detector.conv_scale[0]) / detector.conv_scale[1]).any())       # wins somewhere
    # The threshold keeps KEEP of the training images: 95% of them at or under it.
    assert threshold == pytest.approx(float(np.quantile(score.double().numpy(), ood.KEEP)), rel=1e-6)
    assert np.mean(score.numpy() <= threshold) == pytest.approx(ood.KEEP, abs=1 / COUNT)


def test_the_fitted_buffers_are_float32_class_means_and_log_determinants(fitted):
    network, x, y, detector, _, _ = fitted
    px = x.reshape(len(x), -1).astype(np.float64)
    assert {name: tuple(buffer.shape) for name, buffer in detector.named_buffers()} == {
        "pixel_means": (10, 784), "pixel_whiten": (784, 784), "pixel_scale": (2,), "conv_means": (10, 192),
        "conv_whiten": (10, 192, 192), "conv_logdet": (10,), "conv_scale": (2,), "ink_limit": (1,)}
    assert all(buffer.dtype == torch.float32 for buffer in detector.buffers())
    np.testing.assert_allclose(detector.pixel_means.numpy(), [px[y == c].mean(0) for c in range(10)], atol=1e-6)
    assert detector.network is network and not detector.training


def test_the_distances_are_mahalanobis_distances_for_any_whitening():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    covariance = a @ a.T + np.eye(6)
    w = ood.whitening(covariance, 0.0)
    np.testing.assert_allclose(w @ w.T, np.linalg.inv(covariance), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.tril(w), w)   # Cholesky's lower triangle
    ridged = covariance + 0.5 * np.trace(covariance) / 6 * np.eye(6)
    np.testing.assert_allclose(ood.regularised(covariance, 0.5), ridged)
    x, means = rng.normal(size=(5, 6)), rng.normal(size=(3, 6))
    precision = np.linalg.inv(covariance)
    expected = np.array([[(p - m) @ precision @ (p - m) for m in means] for p in x])
    got = ood.squared_distances(torch.from_numpy(x), torch.from_numpy(means), torch.from_numpy(w))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)
    others = [b @ b.T + np.eye(6) for b in rng.normal(size=(3, 6, 6))]
    whitens = np.stack([ood.whitening(c, 0.0) for c in others])
    expected = np.array([[(p - m) @ np.linalg.inv(c) @ (p - m) for m, c in zip(means, others, strict=True)]
                         for p in x])
    got = ood.per_class_distances(torch.from_numpy(x), torch.from_numpy(means), torch.from_numpy(whitens))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


def test_the_shared_covariance_is_around_each_rows_own_class_mean():
    rng = np.random.default_rng(1)
    labels = np.array([3, 7, 3, 7, 7, 9])                   # classes that are not 0..C-1
    x = rng.normal(size=(6, 2))
    means = np.stack([x[labels == c].mean(0) for c in (3, 7, 9)])
    centred = x - means[[0, 1, 0, 1, 1, 2]]
    np.testing.assert_allclose(ood.shared_covariance(x, labels, means), centred.T @ centred / 6)


def test_a_blank_image_scores_ink_blank_and_an_inked_one_is_not_flagged_by_its_ink(fitted):
    network, x, y, detector, threshold, images = fitted
    ink = (x.astype(np.float64) ** 2).reshape(len(x), -1).sum(1)
    assert float(detector.ink_limit) == pytest.approx(ood.INK_SHARE * ink.min(), rel=1e-6)
    limit = float(detector.ink_limit)
    at_limit = np.full((1, 1, 28, 28), np.sqrt(limit / 784), np.float32)        # exactly ink_limit of ink
    half = np.full((1, 1, 28, 28), np.sqrt(limit / 2 / 784), np.float32)        # half of it
    with torch.inference_mode():
        blank = detector.blank(torch.from_numpy(np.concatenate([np.zeros_like(at_limit), half, at_limit, x])))
        _, scores = detector(torch.zeros(3, 1, 28, 28))
    np.testing.assert_allclose(blank[:3].numpy(), [ood.INK_BLANK, ood.INK_BLANK / 2, 0], atol=1e-4)
    # The faintest training image has twice ink_limit: its ink part is -INK_BLANK, the others' lower.
    assert float(blank[3:].max()) == pytest.approx(-ood.INK_BLANK, abs=1e-3)
    assert scores.tolist() == [ood.INK_BLANK] * 3 and ood.INK_BLANK > threshold   # all black: flagged
