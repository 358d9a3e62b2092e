"""The out-of-distribution scores measured against each other: how well each tells the sets of tests/images.py
from Fashion-MNIST's test images (AUROC), and the share of each set it flags at the threshold that keeps 95%
of the training images.

    python -m bench.ood export/fmnist.pt [--count 300]      # prints a markdown table

Every score is fitted to the 60,000 training images, as `fmnist export` fits the one it ships (fmnist.ood);
the test images and the other sets only judge. The sets go through `fmnist predict`'s preparation; the
product photos are made in each of tests/images.py's PHOTO_VARIATIONS too, and the table says for each set
of photos the share classified as the test image it shows is by the Network.
"""

import argparse
import io

import numpy as np
import torch
import torch.nn.functional as F

from fmnist import data, ood, runtime
from fmnist.checkpoint import load_network
from tests.images import NOT_GARMENTS, PHOTO_VARIATIONS, not_garments, product_photo


def prepared(image, fmt="PNG", quality=90) -> np.ndarray:
    """An image as `fmnist predict` gives it to the model, through a file of that format."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    buffer.seek(0)
    return runtime.load_image(buffer).input[0]


def sets(count: int) -> dict[str, np.ndarray]:
    test = data.load("test")
    made = {"test images": runtime.to_model_input(test.images),
            "product photos": np.stack([prepared(product_photo(test.images[i]), "JPEG") for i in range(count)])}
    for name, options in PHOTO_VARIATIONS.items():
        made[f"photos, {name}"] = np.stack([prepared(product_photo(test.images[i], **options), "JPEG",
                                                     options.get("quality", 90)) for i in range(count)])
    for name in NOT_GARMENTS:
        made[name] = np.stack([prepared(image) for image in not_garments(name, count, seed=1)])
    return made


@torch.inference_mode()
def scorers(network, train: data.Split) -> dict:
    """Each candidate score: a function of images (N, 1, 28, 28) to scores (N,), higher: less like Fashion-MNIST."""
    x = runtime.to_model_input(train.images)
    detector, _ = ood.fit(network, x, train.labels)

    def penultimate(images):   # fc2's 60 values
        h = network.convolutions(torch.from_numpy(images))
        return F.relu(network.fc2(F.relu(network.fc1(h))))

    fc2 = penultimate(x).double().numpy()
    means = np.stack([fc2[train.labels == c].mean(0) for c in range(10)])
    centred = fc2 - means[train.labels]   # one covariance shared by the classes, around each one's mean
    whiten = torch.from_numpy(ood.whitening(ood.regularised(centred.T @ centred / len(fc2), ood.PIXEL_RIDGE))).float()
    means = torch.from_numpy(means).float()

    def mahalanobis(h):   # (N,) the squared distance to the nearest class mean
        z, m = h @ whiten, means @ whiten
        return ((z * z).sum(1, keepdim=True) - 2 * z @ m.T + (m * m).sum(1)).min(1).values

    def batched(fn):
        def score(images):
            with torch.inference_mode():
                return np.concatenate([fn(images[i:i + ood.BATCH]) for i in range(0, len(images), ood.BATCH)])
        return score

    logits = lambda images: network(torch.from_numpy(images))   # noqa: E731
    return {
        "max softmax probability": batched(lambda b: -F.softmax(logits(b), 1).max(1).values.numpy()),
        "energy": batched(lambda b: -torch.logsumexp(logits(b), 1).numpy()),
        "Mahalanobis, fc2": batched(
            lambda b: mahalanobis(penultimate(b)).numpy()),
        "pixels, least varied directions": batched(lambda b: detector.parts(torch.from_numpy(b))[1][:, 0].numpy()),
        "Gaussians per class, conv1": batched(lambda b: detector.parts(torch.from_numpy(b))[2].amin(1).numpy()),
        "fmnist: pixels, conv1, ink": batched(lambda b: detector(torch.from_numpy(b))[1].numpy()),
    }


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The chance that an image of `outside` scores higher than one of `inside`."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--count", type=int, default=300, help="images in each set but the test images")
    args = parser.parse_args()
    network = load_network(args.checkpoint).eval()
    train = data.load("train")
    methods = scorers(network, train)
    thresholds = {name: np.quantile(score(runtime.to_model_input(train.images)), ood.KEEP)
                  for name, score in methods.items()}
    made = sets(args.count)
    scores = {name: {s: score(images) for s, images in made.items()} for name, score in methods.items()}
    print(f"{args.checkpoint}: share flagged at the threshold keeping {ood.KEEP:.0%} of the training images, "
          f"and AUROC against the test images\n")
    with torch.inference_mode():
        classes = {s: network(torch.from_numpy(images[:args.count])).argmax(1).numpy() for s, images in made.items()}
    print("| set | " + " | ".join(methods) + " | same class |")
    print("| --- |" + " ---: |" * (len(methods) + 1))
    for s in made:
        photos = s == "product photos" or s.startswith("photos, ")
        same = f"{(classes[s] == classes['test images']).mean():.1%}" if photos else ""
        cells = []
        for name in methods:
            value = scores[name][s]
            flagged = f"{(value > thresholds[name]).mean():.1%}"
            cells.append(flagged if s == "test images"
                         else f"{flagged} ({auroc(scores[name]['test images'], value):.3f})")
        print(f"| {s} | " + " | ".join(cells) + f" | {same} |")


if __name__ == "__main__":
    main()
