import gzip
import re
import shutil

import numpy as np
import pytest

from fmnist import FmnistError, data


def write_idx(path, array: np.ndarray, magic_type: int = 0x08, compress: bool = False):
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = write_idx(tmp_path / ("x.gz" if compress else "x"), images, compress=compress)
    np.testing.assert_array_equal(data.read_idx(path), images)


def test_read_idx_labels(tmp_path):
    labels = np.array([9, 0, 3], dtype=np.uint8)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "y", labels)), labels)


def test_bad_magic_is_named(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((2, 3)), magic_type=0x0D)   # 0x0D: float32, not ubyte
    with pytest.raises(FmnistError, match=r"x: not an IDX file"):
        data.read_idx(path)


def test_truncated_data_is_named(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FmnistError, match=r"x: holds 3126 bytes of data where its header declares 3136"):
        data.read_idx(path)


def test_truncated_header_is_named(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(FmnistError, match=r"x: IDX header is cut short"):
        data.read_idx(path)


def test_truncated_gzip_is_named(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (50, 28, 28))   # noise: barely compresses
    path = write_idx(tmp_path / "x.gz", pixels, compress=True)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FmnistError, match=r"x.gz: the gzip stream is corrupt or truncated"):
        data.read_idx(path)


def test_find_files_in_torchvision_layout_and_mixed_compression(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    names = list(data.SHA256)
    for i, name in enumerate(names):
        (raw / (name + (".gz" if i % 2 else ""))).write_bytes(b"")
    files = data.find_files(tmp_path)
    assert files == {name: raw / (name + (".gz" if i % 2 else "")) for i, name in enumerate(names)}
    (raw / names[0]).unlink()
    assert data.find_files(tmp_path) is None


def test_named_folder_without_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FMNIST_DATA", str(tmp_path))
    with pytest.raises(FmnistError, match=r"not found in .*apt-get install dataset-fashion-mnist.*--data-dir"):
        data.load("test", download=False)


def test_named_folder_is_the_only_place_used(real_data, tmp_path):
    # Real data exists elsewhere (./data or Debian's), but a named folder is used alone.
    with pytest.raises(FmnistError, match=re.escape(str(tmp_path))):
        data.locate(tmp_path, download=False)


def test_real_splits_load_and_are_balanced(real_data):
    train, test = data.load("train", download=False), data.load("test", download=False)
    assert train.images.shape == (60_000, 28, 28) and test.images.shape == (10_000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6_000] * 10
    assert np.bincount(test.labels).tolist() == [1_000] * 10


def test_wrong_contents_fail_the_checksum_naming_the_file(real_data, tmp_path):
    for path in real_data.values():
        shutil.copy(path, tmp_path / path.name)
    fake = tmp_path / "t10k-images-idx3-ubyte"
    for stale in tmp_path.glob("t10k-images-idx3-ubyte*"):
        stale.unlink()
    write_idx(fake, np.zeros((10_000, 28, 28)))     # right shape, wrong pixels
    with pytest.raises(FmnistError, match=r"t10k-images-idx3-ubyte: contents differ .* \(checksum\)"):
        data.load("test", data_dir=tmp_path, download=False)


def test_to_tensors_scales_pixels(real_data):
    images, labels = data.to_tensors(data.load("test", download=False), "cpu")
    assert images.shape == (10_000, 1, 28, 28) and images.dtype.is_floating_point
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert labels.dtype.is_floating_point is False and int(labels.max()) == 9


def test_a_failed_download_removes_every_folder_it_created(tmp_path, monkeypatch):
    """No internet here: the mirror is a closed port on loopback, so the download fails at once, as it does
    on a machine without network access (FMNIST_DATA=/missing/deeper left /missing behind)."""
    from torchvision.datasets import FashionMNIST

    monkeypatch.delenv("FMNIST_OFFLINE")
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    monkeypatch.setenv("FMNIST_DATA", str(tmp_path / "missing" / "deeper"))
    with pytest.raises(FmnistError, match="not found in"):
        data.locate()
    assert list(tmp_path.iterdir()) == []
