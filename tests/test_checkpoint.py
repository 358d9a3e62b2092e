"""fmnist.checkpoint on its own, with the real Network and real torch.save/torch.load files: what a checkpoint
holds and that torch.load(weights_only=True) reads it all, every tensor on the CPU, and every file that is not
a checkpoint (or not one to resume) refused with the exact words it says, a hostile one without running it."""

import copy
import json
import os
import platform
import zipfile
from dataclasses import asdict

import pytest
import torch

from fmnist import FmnistError, __version__
from fmnist.checkpoint import load_checkpoint, load_network, on_cpu, save_checkpoint, saved_epoch, write_metrics
from fmnist.config import TrainConfig
from fmnist.model import Network

CONFIG = TrainConfig(epochs=3, lr=0.01, device="cpu", out="run")
HISTORY = [{"epoch": e, "train_loss": 1.0 / e, "test_accuracy": 0.8 + e / 100} for e in (1, 2, 3)]
PASS_ONE = "pass a fmnist.pt written by `fmnist train`"


def network(seed: int = 0) -> Network:
    torch.manual_seed(seed)
    return Network()


def training_of(model: Network) -> dict:
    """What --resume reads, as a TrainingState's state_dict holds it, of a copy of `model` one real Adam step on."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": None,
            "order": torch.Generator().manual_seed(0).get_state(), "device": "cpu", "scaler": {}}


def saved(path, model: Network | None = None, history: list[dict] = HISTORY):
    model = model or network()
    save_checkpoint(path, model.state_dict(), training_of(model), CONFIG, history)
    return path


def equal(a, b) -> bool:
    """Values equal all the way down, tensors included."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def refusal(path, resume: bool = False) -> str:
    with pytest.raises(FmnistError) as caught:
        load_checkpoint(path, resume)
    assert caught.value.__cause__ is None and (caught.value.__context__ is None or caught.value.__suppress_context__)
    return str(caught.value)   # alone: no exception of torch's shown with it


# ---- what a checkpoint holds -------------------------------------------------------------------------------------

def test_a_checkpoint_holds_the_weights_the_run_and_the_versions_and_loads_with_weights_only(tmp_path):
    model = network()
    training = training_of(model)
    save_checkpoint(tmp_path / "fmnist.pt", model.state_dict(), training, CONFIG, HISTORY)
    checkpoint = torch.load(tmp_path / "fmnist.pt", weights_only=True)
    assert list(checkpoint) == ["model", "epoch", "config", "metrics", "versions", "training"]
    assert equal(checkpoint["model"], dict(model.state_dict()))
    assert checkpoint["epoch"] == 3   # the last row's
    assert checkpoint["config"] == asdict(CONFIG) and checkpoint["metrics"] == HISTORY
    assert checkpoint["versions"] == {"fmnist": __version__, "torch": str(torch.__version__),
                                      "python": platform.python_version()}
    assert equal(checkpoint["training"], training)
    assert sorted(os.listdir(tmp_path)) == ["fmnist.pt"]   # written whole under its name: no temporary file left


def test_the_epoch_is_the_last_rows_whatever_the_others(tmp_path):
    saved(tmp_path / "fmnist.pt", history=[{"epoch": 7}, {"epoch": 8}])
    assert torch.load(tmp_path / "fmnist.pt", weights_only=True)["epoch"] == 8


def test_weights_are_saved_contiguous(tmp_path):
    """A transposed view is saved as its own values in order, not as a view of a larger storage."""
    weights = {"w": torch.arange(6.0).reshape(2, 3).t()}
    save_checkpoint(tmp_path / "fmnist.pt", weights, {}, CONFIG, HISTORY)
    loaded = torch.load(tmp_path / "fmnist.pt", weights_only=True)["model"]["w"]
    assert loaded.is_contiguous() and torch.equal(loaded, weights["w"])


def test_a_checkpoint_replaces_the_one_there(tmp_path):
    saved(tmp_path / "fmnist.pt", network(0))
    saved(tmp_path / "fmnist.pt", network(1))
    assert equal(load_checkpoint(tmp_path / "fmnist.pt")["model"], dict(network(1).state_dict()))
    assert sorted(os.listdir(tmp_path)) == ["fmnist.pt"]


def test_on_cpu_keeps_the_structure_and_every_value(tmp_path):
    t = torch.arange(3)
    value = {"a": [t, (t, 1, "x")], "b": {"c": None, "d": 2.5}, "e": (), "f": []}
    moved = on_cpu(value)
    assert equal(moved, value)
    assert type(moved["a"][1]) is tuple and moved["a"][0].device.type == "cpu"
    assert on_cpu(t).device.type == "cpu" and on_cpu("plain") == "plain"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_on_cpu_moves_device_tensors_to_the_cpu(device):
    t = torch.arange(3, device=device)
    moved = on_cpu({"a": [t, (t,)], "b": t})
    assert [moved["a"][0].device.type, moved["a"][1][0].device.type, moved["b"].device.type] == ["cpu"] * 3
    assert equal(moved, {"a": [t.cpu(), (t.cpu(),)], "b": t.cpu()})


def test_metrics_are_one_json_object_per_epoch_rewritten_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, HISTORY)
    assert path.read_text() == "".join(json.dumps(row) + "\n" for row in HISTORY)
    assert [json.loads(line) for line in path.read_text().splitlines()] == HISTORY
    write_metrics(path, HISTORY[:1])
    assert path.read_text() == json.dumps(HISTORY[0]) + "\n"
    write_metrics(path, [])
    assert path.read_text() == ""
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


# ---- load_checkpoint: read safely, checked -----------------------------------------------------------------------

def test_a_checkpoint_loads_as_it_was_saved(tmp_path):
    path = saved(tmp_path / "fmnist.pt")
    for resume in (False, True):
        checkpoint = load_checkpoint(str(path), resume=resume)
        assert checkpoint["epoch"] == 3 and checkpoint["metrics"] == HISTORY
        assert equal(checkpoint["model"], dict(network().state_dict()))


def test_weights_saved_on_a_gpu_load_onto_the_cpu(tmp_path):
    """A checkpoint whose tensors were saved on CUDA (by another program: fmnist saves on the CPU), made from
    torch.save's own file with its storages' location changed as a GPU machine writes it."""
    torch.save({"model": {"w": torch.arange(3.0)}}, tmp_path / "cpu.pt")
    with zipfile.ZipFile(tmp_path / "cpu.pt") as source, zipfile.ZipFile(tmp_path / "gpu.pt", "w") as gpu:
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename.endswith("/data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            gpu.writestr(entry, data)
    weights = load_checkpoint(tmp_path / "gpu.pt")["model"]
    assert weights["w"].device.type == "cpu" and torch.equal(weights["w"], torch.arange(3.0))


def test_a_missing_checkpoint_says_how_to_make_one(tmp_path):
    assert refusal(tmp_path / "fmnist.pt") == (f"checkpoint {tmp_path}/fmnist.pt not found; train one with `fmnist "
                                               "train` or pass --checkpoint PATH")
    assert refusal(tmp_path) == (f"checkpoint {tmp_path} not found; train one with `fmnist train` or pass "
                                 "--checkpoint PATH")   # a folder is not a checkpoint either


@pytest.mark.parametrize("content", [b"epoch 3: 91.2%\n", b"", b"\x89PNG\r\n\x1a\n" + bytes(100), b"PK\x03"],
                         ids=["text", "empty", "image", "short"])
def test_a_file_torch_did_not_write_is_not_a_readable_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    assert refusal(path) == (f"{path} is not a readable fmnist checkpoint: it is not a file that torch.save wrote "
                             f"(a text file, an image, or empty?); {PASS_ONE}")


def test_a_checkpoint_cut_short_is_damaged(tmp_path):
    path = saved(tmp_path / "fmnist.pt")
    path.write_bytes(path.read_bytes()[:-200])   # the zip's directory at its end is gone
    assert refusal(path) == f"{path} is not a readable fmnist checkpoint: the file is damaged or cut short; {PASS_ONE}"


class Hostile:
    """Pickled as a call of os.mkdir: loading it with pickle's full powers would make the folder."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return (os.mkdir, (self.folder,))


@pytest.mark.parametrize("environment", [{}, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}],
                         ids=["as-is", "torch-told-to-load-anything"])
def test_a_hostile_checkpoint_is_refused_without_running_its_code(tmp_path, monkeypatch, environment):
    """Even where the environment tells torch.load to load anything by default (as some advice for old
    checkpoints does): fmnist asks for weights only, in so many words."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "hostile.pt"
    torch.save({"model": Hostile(tmp_path / "hacked")}, path)
    assert refusal(path) == (f"{path} is not a readable fmnist checkpoint: it holds Python objects besides tensors "
                             f"and plain values, which are never loaded (they could run code); {PASS_ONE}")
    assert not (tmp_path / "hacked").exists()


@pytest.mark.parametrize("content", [{"weights": {"w": torch.zeros(3)}}, [{"model": {}}], torch.zeros(3)],
                         ids=["no-model", "a-list", "a-tensor"])
def test_a_file_without_weights_under_model_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    assert refusal(path) == f"{path} is not an fmnist checkpoint (no 'model' entry); {PASS_ONE}"


@pytest.mark.parametrize("model", [[torch.zeros(3)], {"w": torch.zeros(3), "b": [0.0]}, "weights"],
                         ids=["a-list", "not-all-tensors", "a-string"])
def test_a_model_entry_that_is_not_weights_is_refused(tmp_path, model):
    path = tmp_path / "odd.pt"
    torch.save({"model": model}, path)
    assert refusal(path) == f"{path} is not an fmnist checkpoint (its 'model' is not a set of weights); {PASS_ONE}"


def test_weights_alone_load_when_not_resuming(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    assert equal(load_checkpoint(path), {"model": {"w": torch.ones(2)}})


@pytest.mark.parametrize("key, kind", [("config", "dict"), ("metrics", "list"), ("training", "dict")])
@pytest.mark.parametrize("value", [None, "something else"], ids=["missing", "another-type"])
def test_resume_needs_each_of_its_entries_of_its_type(tmp_path, key, kind, value):
    checkpoint = torch.load(saved(tmp_path / "fmnist.pt"), weights_only=True)
    if value is None:
        del checkpoint[key]
    else:
        checkpoint[key] = value
    torch.save(checkpoint, tmp_path / "fmnist.pt")
    assert load_checkpoint(tmp_path / "fmnist.pt")["epoch"] == 3   # weights alone still load
    assert refusal(tmp_path / "fmnist.pt", resume=True) == (
        f"{tmp_path}/fmnist.pt cannot be resumed: its '{key}' entry is missing or not a {kind} (not written by "
        "`fmnist train`, or by an older version); train afresh")


# ---- saved_epoch and load_network --------------------------------------------------------------------------------

def test_the_saved_epoch_of_a_run_folder(tmp_path):
    assert saved_epoch(tmp_path) is None
    saved(tmp_path / "fmnist.pt", history=[{"epoch": 1}, {"epoch": 2}])
    assert saved_epoch(str(tmp_path)) == 2


def test_a_run_folder_whose_checkpoint_has_no_epoch_saved_none(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "fmnist.pt")
    assert saved_epoch(tmp_path) is None


def test_the_saved_epoch_of_a_damaged_checkpoint_is_refused(tmp_path):
    (tmp_path / "fmnist.pt").write_text("not a checkpoint")
    with pytest.raises(FmnistError) as caught:
        saved_epoch(tmp_path)
    assert str(caught.value) == (f"{tmp_path}/fmnist.pt is not a readable fmnist checkpoint: it is not a file that "
                                 f"torch.save wrote (a text file, an image, or empty?); {PASS_ONE}")


def test_the_network_comes_back_with_its_weights_in_eval_mode(tmp_path):
    path = saved(tmp_path / "fmnist.pt", network(3))
    model = load_network(str(path))
    assert isinstance(model, Network) and not model.training and not any(m.training for m in model.modules())
    assert equal(dict(model.state_dict()), dict(network(3).state_dict()))
    images = torch.rand(4, 1, 28, 28)
    assert torch.equal(model(images), network(3).eval()(images))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet-ish.pt"
    torch.save({"model": torch.nn.Linear(784, 10).state_dict()}, path)
    with pytest.raises(FmnistError) as caught:
        load_network(path)
    assert str(caught.value) == f"{path} holds the weights of another architecture, not the tutorial's Network"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_network_from_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(FmnistError) as caught:
        load_network(tmp_path / "fmnist.pt")
    assert str(caught.value) == (f"checkpoint {tmp_path}/fmnist.pt not found; train one with `fmnist train` or pass "
                                 "--checkpoint PATH")
