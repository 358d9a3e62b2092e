"""One training run of the Network by one peer, the way its users would write it, in a process of its own:

    python -m bench.peers PEER --epochs 3 [--torchvision-root DIR]

PEER is one of PEERS. Every peer trains the same Network (the tutorial's layers) from the same initial weights,
with the seed recipe: Adam at 0.01, batches of 100 in a new random order each epoch, no augmentation. The
last line printed is JSON: the seconds of each epoch's training pass (no evaluation inside it), the samples/s
over them, and the test accuracy after the last epoch, measured by the peer itself. bench/test_peers.py runs
the peers in turn, interleaved, and tabulates them. A process each: Keras picks its backend once, at import.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

LR, BATCH, SEED = 0.01, 100, 0   # the seed recipe

# The peer, the modules it needs beyond fmnist's own dependencies, and the Keras backend it runs on.
PEERS = {
    "fmnist loop": ((), None),
    "tutorial loop": ((), None),
    "Lightning": (("lightning",), None),
    "Keras, torch backend": (("keras",), "torch"),
    "Keras, JAX backend": (("keras", "jax"), "jax"),
}


def initial_weights() -> dict:
    """The Network's initial state_dict, the same for every peer: torch's default initialisation, seeded."""
    import torch

    from fmnist.model import Network

    torch.manual_seed(SEED)
    return Network().state_dict()


def splits():
    from fmnist import data

    return data.load("train", download=False), data.load("test", download=False)


def fmnist_loop(epochs: int, **_) -> tuple[list[float], float]:
    """fmnist's own loop, as `fmnist train --recipe seed` runs it on a CPU."""
    import torch

    from fmnist import data
    from fmnist.config import recipe
    from fmnist.loop import TrainingState, make_step, train_epoch
    from fmnist.train import evaluate

    train, test = splits()
    images, labels = data.to_tensors(train, "cpu")
    config = recipe("seed", device="cpu", seed=SEED)
    state = TrainingState(config, torch.device("cpu"), steps_per_epoch=len(images) // config.batch_size)
    state.model.load_state_dict(initial_weights())
    step = make_step(state.model, state)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        train_epoch(step, images, labels, config, state.order)
        seconds.append(time.perf_counter() - start)
    return seconds, evaluate(state.model, *data.to_tensors(test, "cpu"))[1]


def tutorial_loop(epochs: int, torchvision_root: str, **_) -> tuple[list[float], float]:
    """The tutorial's own: its Network class, torchvision's dataset with ToTensor, a DataLoader, and its
    bookkeeping of the loss and the number correct, read back every step."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch.utils.data import DataLoader

    from fmnist import data
    from fmnist.train import evaluate
    from tests import tutorial

    train_set = torchvision.datasets.FashionMNIST(root=torchvision_root, train=True, download=False,
                                                  transform=torchvision.transforms.ToTensor())
    loader = DataLoader(train_set, batch_size=BATCH, shuffle=True)
    network = tutorial.Network()
    network.load_state_dict(initial_weights())
    optimizer = torch.optim.Adam(network.parameters(), lr=LR)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        total_loss = total_correct = 0
        for images, labels in loader:
            preds = network(images)
            loss = F.cross_entropy(preds, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            total_correct += preds.argmax(dim=1).eq(labels).sum().item()
        seconds.append(time.perf_counter() - start)
    return seconds, evaluate(network, *data.to_tensors(splits()[1], "cpu"))[1]


def lightning(epochs: int, **_) -> tuple[list[float], float]:
    """PyTorch Lightning as its docs teach it: a LightningModule, a Trainer, a DataLoader (of the images as
    in-memory tensors, the cheapest a DataLoader gets)."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from fmnist import data
    from fmnist.model import Network
    from fmnist.train import evaluate

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.network = Network()

        def training_step(self, batch, batch_idx):
            images, labels = batch
            loss = F.cross_entropy(self.network(images), labels)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LR)

    class EpochTimer(L.Callback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.seconds.append(time.perf_counter() - self.start)

    train, test = splits()
    classifier = Classifier()
    classifier.network.load_state_dict(initial_weights())
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(classifier, DataLoader(TensorDataset(*data.to_tensors(train, "cpu")), batch_size=BATCH, shuffle=True))
    return timer.seconds, evaluate(classifier.network, *data.to_tensors(test, "cpu"))[1]


def keras_model():
    """The Network in Keras layers, channels last, holding the same initial weights as every other peer."""
    import keras
    from keras import layers

    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(6, 5, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(12, 5, activation="relu"), layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(120, activation="relu"), layers.Dense(60, activation="relu"), layers.Dense(10),
    ])
    w = {name: tensor.numpy() for name, tensor in initial_weights().items()}
    # torch's kernels are (out, in, h, w) and Keras' (h, w, in, out); torch flattens conv2's maps channel first,
    # Keras channel last, so fc1's inputs are reordered to match.
    fc1 = w["fc1.weight"].reshape(120, 12, 4, 4).transpose(2, 3, 1, 0).reshape(192, 120)
    model.set_weights([w["conv1.weight"].transpose(2, 3, 1, 0), w["conv1.bias"],
                       w["conv2.weight"].transpose(2, 3, 1, 0), w["conv2.bias"],
                       fc1, w["fc1.bias"], w["fc2.weight"].T, w["fc2.bias"], w["out.weight"].T, w["out.bias"]])
    return model


def pixels(split) -> np.ndarray:
    """A split's images as Keras lays them out: (N, 28, 28, 1), channels last, float32 in [0, 1]."""
    return (split.images[..., None] / np.float32(255)).astype(np.float32)


def check_same_network(logits: np.ndarray, images: np.ndarray) -> None:
    """A peer's Network, before training, gives the logits of fmnist's Network with the same weights: the layers,
    their order and the weights' layout were carried over right."""
    import torch

    from fmnist.model import Network

    network = Network()
    network.load_state_dict(initial_weights())
    with torch.inference_mode():
        expected = network(torch.from_numpy(images[:, None] / np.float32(255))).numpy()
    if not np.allclose(logits, expected, atol=1e-4):
        sys.exit(f"not the same network: logits differ by up to {np.abs(logits - expected).max():.2g}")


def keras(epochs: int, **_) -> tuple[list[float], float]:
    """Keras 3 as its guides teach it: compile, then fit on arrays, with the accuracy metric, on the backend
    that KERAS_BACKEND names (bench/test_peers.py sets it)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    train, test = splits()
    model = keras_model()
    check_same_network(model.predict(pixels(test)[:100], verbose=0), test.images[:100])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LR, epsilon=1e-8),   # torch's epsilon
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    timer = EpochTimer()
    model.fit(pixels(train), train.labels.astype(np.int64), batch_size=BATCH, epochs=epochs, shuffle=True,
              verbose=0, callbacks=[timer])
    _, accuracy = model.evaluate(pixels(test), test.labels.astype(np.int64), batch_size=1000, verbose=0)
    return timer.seconds, float(accuracy)


RUN = {"fmnist loop": fmnist_loop, "tutorial loop": tutorial_loop, "Lightning": lightning,
       "Keras, torch backend": keras, "Keras, JAX backend": keras}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--torchvision-root", help="a FashionMNIST root torchvision reads without downloading")
    args = parser.parse_args(argv)
    backend = PEERS[args.peer][1]
    if backend and os.environ.get("KERAS_BACKEND") != backend:
        sys.exit(f"{args.peer}: set KERAS_BACKEND={backend} before Python starts")
    seconds, accuracy = RUN[args.peer](args.epochs, torchvision_root=args.torchvision_root)
    samples = 60_000 * len(seconds)
    print(json.dumps({"peer": args.peer, "epoch_seconds": seconds, "samples_per_second": samples / sum(seconds),
                      "test_accuracy": accuracy}))


if __name__ == "__main__":
    main(sys.argv[1:])
