"""Find, verify and load Fashion-MNIST; put it on the training device as tensors.

The four IDX files are looked for, in this order:
  1. the folder named by --data-dir or the FMNIST_DATA variable (then only there: read from it, or
     downloaded into it where a network exists, never silently taken from elsewhere);
  2. ./data, torchvision's layout (data/FashionMNIST/raw);
  3. /usr/share/datasets/fashion-mnist (Debian's package dataset-fashion-mnist, usable offline);
  4. torchvision's download into ./data, where a network exists.
A folder may hold the files plain or gzipped, directly or under FashionMNIST/raw.

Parsing uses numpy only, so the onnxruntime commands load the test set without torch.
"""

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmnist import FmnistError
from fmnist.files import missing_parents, remove_if_empty

if TYPE_CHECKING:   # for hints alone: torch is imported where tensors are made
    import torch

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DIR = Path("data")

# sha256 of each file's decompressed bytes. Debian recompressed the .gz files, so their own hashes
# differ from torchvision's list; the bytes inside are the originals, and these hashes hold for both.
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SPLITS = {  # split: (images file, labels file, number of items)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
HOW_TO_GET = (
    "get it one of these ways: `apt-get install dataset-fashion-mnist` (offline, Debian/Ubuntu); "
    "put the four IDX files (.gz or plain) in ./data/FashionMNIST/raw or in a folder named by "
    "--data-dir / FMNIST_DATA; or run once with internet access so torchvision downloads it"
)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28) uint8, light garment on a dark background
    labels: np.ndarray  # (N,) uint8, 0..9, names in fmnist.model.CLASSES


# ---- IDX files -----------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (plain or .gz) into an array of its declared shape, checking it as we go."""
    return parse_idx(_read_bytes(path), path)


def parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """The array in an IDX file's decompressed bytes; `path` names the file in errors."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise FmnistError(f"{path}: not an IDX file of unsigned bytes (bad magic number); get the file again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise FmnistError(f"{path}: IDX header is cut short; the file is truncated, get it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise FmnistError(
            f"{path}: holds {len(raw) - header} bytes of data where its header declares "
            f"{int(np.prod(shape))}; the file is truncated or corrupt, get it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise FmnistError(f"{path}: the gzip stream is corrupt or truncated ({e}); get the file again") from None
    except OSError as e:
        raise FmnistError(f"{path}: cannot be read ({e.strerror})") from None


# ---- finding and loading the set -----------------------------------------------------------------

def find_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in `folder` or its FashionMNIST/raw, plain preferred over .gz; None if incomplete."""
    for place in (folder, folder / "FashionMNIST" / "raw"):
        found = {}
        for name in SHA256:
            for candidate in (place / name, place / f"{name}.gz"):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(SHA256):
            return found
    return None


def locate(data_dir: str | Path | None = None, download: bool = True) -> dict[str, Path]:
    """Where the four files are, searched in the order of this module's docstring."""
    explicit = data_dir or os.environ.get("FMNIST_DATA")
    if explicit:
        folder = Path(explicit)
        files = find_files(folder)
        if files is None and download:
            _download(folder)
            files = find_files(folder)
        if files is None:
            raise FmnistError(f"Fashion-MNIST not found in {folder} (named by --data-dir or FMNIST_DATA); {HOW_TO_GET}")
        return files
    for folder in (DEFAULT_DIR, DEBIAN_DIR):
        files = find_files(folder)
        if files is not None:
            return files
    if download:
        _download(DEFAULT_DIR)
        files = find_files(DEFAULT_DIR)
        if files is not None:
            return files
    raise FmnistError(f"Fashion-MNIST not found in ./data or {DEBIAN_DIR}; {HOW_TO_GET}")


DOWNLOAD_TIMEOUT = 30   # seconds without an answer before a download is given up


def _download(root: Path) -> None:
    """torchvision's download into root/FashionMNIST/raw. Needs internet access; failure is not fatal here
    (locate() then says how to get the data), and leaves none of the folders it made. FMNIST_OFFLINE=1 skips
    it (the tests set it: no test downloads)."""
    import socket

    if os.environ.get("FMNIST_OFFLINE"):
        return
    from torchvision.datasets import FashionMNIST

    made = missing_parents(root / "FashionMNIST" / "raw")   # all it will make: /missing of /missing/deeper too
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)   # a silent server is given up, not waited on for ever
    try:
        for train in (True, False):
            FashionMNIST(root=str(root), train=train, download=True)
    except Exception:  # no network, a proxy, a mirror down
        remove_if_empty(made)
    finally:
        socket.setdefaulttimeout(timeout)


def load(split: str, data_dir: str | Path | None = None, download: bool = True) -> Split:
    """One split ("train" or "test"), verified: shapes, counts, label range and the real set's checksum."""
    images_name, labels_name, count = SPLITS[split]
    files = locate(data_dir, download)
    images = _load_verified(files[images_name], (count, 28, 28))
    labels = _load_verified(files[labels_name], (count,))
    if labels.max() > 9:
        raise FmnistError(f"{files[labels_name]}: labels must be 0 to 9, found {labels.max()}; get the file again")
    return Split(images, labels)


def _load_verified(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    raw = _read_bytes(path)
    array = parse_idx(raw, path)
    if array.shape != shape:
        raise FmnistError(f"{path}: shape {array.shape}, expected {shape} for Fashion-MNIST; get the file again")
    if hashlib.sha256(raw).hexdigest() != SHA256[path.name.removesuffix(".gz")]:
        raise FmnistError(f"{path}: contents differ from the real Fashion-MNIST (checksum); get the file again")
    return array


# ---- tensors on the device -----------------------------------------------------------------------

def to_tensors(split: Split, device: "torch.device | str") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(images, labels) on `device`: float32 pixels in [0, 1] shaped (N, 1, 28, 28), and int64 labels.

    Converted once, so that each training batch is one indexing operation on the device.
    """
    import torch

    images = torch.from_numpy(split.images.copy()).to(device)
    images = images.unsqueeze(1).float().div_(255)
    labels = torch.from_numpy(split.labels.astype(np.int64)).to(device)
    return images, labels


def augment(images: "torch.Tensor", flip: bool, shift: int, generator: "torch.Generator | None") -> "torch.Tensor":
    """A batch (N, 1, 28, 28) with random horizontal flips (half of the images) and random shifts of up to
    `shift` pixels each way (zero-padded), drawn per image from `generator`, all on the batch's device."""
    import torch
    import torch.nn.functional as F

    n, device = len(images), images.device
    if flip:
        flipped = torch.rand(n, device=device, generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    if shift:
        size = 28 + 2 * shift
        padded = F.pad(images, (shift, shift, shift, shift)).view(n, size * size)
        dy, dx = torch.randint(0, 2 * shift + 1, (2, n, 1), device=device, generator=generator)
        window = torch.arange(28, device=device)[:, None] * size + torch.arange(28, device=device)
        # one gather of each image's shifted 28 x 28 window, from one flat index: faster than indexing rows and
        # columns (bench/README.md)
        images = padded.gather(1, dy * size + dx + window.view(1, -1)).view(n, 1, 28, 28)
    return images
