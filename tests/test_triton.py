"""`fmnist export --onnx --triton DIR`: the model repository checked against Triton's own schema (its ModelConfig
protobuf, as tritonclient ships it) and against the ONNX file it was made from. No Triton server runs here."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import triton_to_np_dtype

from fmnist import FmnistError, data, triton
from fmnist.model import CLASSES
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def repository(trained):
    """One export through the CLI with --triton: (the ONNX file it wrote, DIR, the command's Result)."""
    out, _ = trained
    model, directory = out / "triton-export.onnx", out / "triton-repository"
    result = run_cli("export", "--onnx", "--checkpoint", out / "fmnist.pt", "--output", model, "--triton", directory)
    assert result.exit_code == 0, result.output
    return model, directory, result


def parse_config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_tensors(values) -> dict[str, tuple[np.dtype, list[int]]]:
    """{name: (numpy dtype, full shape with -1 for a symbolic axis)} of ONNX inputs or outputs."""
    return {v.name: (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                     [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
            for v in values}


def triton_tensors(entries, max_batch_size: int) -> dict[str, tuple[np.dtype, list[int]]]:
    """{name: (numpy dtype, the full shape the model sees)}, as Triton forms it: [-1] + dims when
    max_batch_size > 0, with `reshape` in place of dims where there is one (docs/user_guide/model_configuration.md)."""
    assert max_batch_size > 0
    return {e.name: (np.dtype(triton_to_np_dtype(model_config_pb2.DataType.Name(e.data_type).removeprefix("TYPE_"))),
                     [-1] + list(e.reshape.shape if e.HasField("reshape") else e.dims))
            for e in entries}


def test_config_matches_the_onnx_model_under_tritons_schema(repository):
    model_path, directory, result = repository
    config = parse_config(directory / "fmnist" / "config.pbtxt")
    model = onnx.load(str(model_path))
    assert config.name == "fmnist" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == triton.MAX_BATCH_SIZE == 1024
    # names, data types and shapes: the same as the ONNX graph's, batch axis included
    assert triton_tensors(config.input, config.max_batch_size) == onnx_tensors(model.graph.input)
    assert triton_tensors(config.output, config.max_batch_size) == onnx_tensors(model.graph.output)
    inputs, outputs = {e.name: e for e in config.input}, {e.name: e for e in config.output}
    assert list(inputs["images"].dims) == [1, 28, 28] and inputs["images"].data_type == model_config_pb2.TYPE_FP32
    logits, score = outputs["logits"], outputs["ood_score"]
    assert list(logits.dims) == [10] and logits.label_filename == "labels.txt" and not logits.HasField("reshape")
    # one value per image: Triton takes no empty dims, so [1] for the API, reshaped to [] for the model
    assert list(score.dims) == [1] and score.HasField("reshape") and list(score.reshape.shape) == []
    assert not score.label_filename
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 10_000
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    meta = {p.key: p.value for p in model.metadata_props}
    assert float(config.parameters["ood_threshold"].string_value) == float(meta["ood_threshold"])
    assert f"wrote the Triton model repository {directory / 'fmnist'}" in result.stdout


def test_repository_holds_the_exported_model_and_its_labels(repository):
    model_path, directory, _ = repository
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    assert files == ["fmnist/1/model.onnx", "fmnist/config.pbtxt", "fmnist/labels.txt"]   # no temporary left
    copy = directory / "fmnist" / "1" / "model.onnx"
    assert copy.read_bytes() == model_path.read_bytes()
    meta = {p.key: p.value for p in onnx.load(str(copy)).metadata_props}
    labels = (directory / "fmnist" / "labels.txt").read_text()
    assert labels.endswith("\n") and labels.splitlines() == json.loads(meta["classes"]) == list(CLASSES)


def test_the_repositorys_model_gives_the_shapes_its_config_declares(repository, real_data):
    """Run the repository's model as Triton's onnxruntime backend would, on a batch of test images: each output
    has the shape the config gives the model, and its labels name the classes fmnist predicts."""
    _, directory, _ = repository
    config = parse_config(directory / "fmnist" / "config.pbtxt")
    test = data.load("test", download=False)
    images = (test.images[:7].astype(np.float32) / 255)[:, None]
    sess = onnxruntime.InferenceSession(str(directory / "fmnist" / "1" / "model.onnx"),
                                        providers=["CPUExecutionProvider"])
    results = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {config.input[0].name: images}),
                       strict=True))
    for name, (dtype, shape) in triton_tensors(config.output, config.max_batch_size).items():
        assert results[name].dtype == dtype and list(results[name].shape) == [len(images)] + shape[1:]
    labels = (directory / "fmnist" / "labels.txt").read_text().splitlines()
    assert [labels[i] for i in results["logits"].argmax(1)] == [CLASSES[i] for i in results["logits"].argmax(1)]
    assert (results["logits"].argmax(1) == test.labels[:7]).mean() >= 4 / 7   # a trained model, not noise


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


def test_an_existing_model_folder_is_refused_and_kept_byte_for_byte(trained, exported, tmp_path):
    directory = tmp_path / "models"
    (directory / "fmnist" / "1").mkdir(parents=True)
    (directory / "fmnist" / "config.pbtxt").write_text('name: "fmnist"  # the user\'s own\n')
    (directory / "fmnist" / "1" / "model.onnx").write_bytes(b"the user's model")
    before = snapshot(directory)
    # through the CLI: refused before the export's minute of work, so nothing new is written either
    output = tmp_path / "new.onnx"
    result = run_cli("export", "--onnx", "--checkpoint", trained[0] / "fmnist.pt", "--output", output,
                     "--triton", directory)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (f"error: {directory / 'fmnist'} already exists and is not empty; remove it, "
                                     "or choose another --triton folder")
    assert not output.exists()
    # and by the library, as the CLI calls it once the export is done
    with pytest.raises(FmnistError, match="already exists and is not empty"):
        triton.write_model_repository(exported[0], directory)
    assert snapshot(directory) == before


def test_beside_other_models_and_into_an_empty_model_folder(exported, tmp_path):
    directory = tmp_path / "models"
    (directory / "fmnist").mkdir(parents=True)                       # empty: nothing to lose
    (directory / "other" / "1").mkdir(parents=True)
    (directory / "other" / "config.pbtxt").write_text('name: "other"\n')
    assert triton.write_model_repository(exported[0], directory) == directory / "fmnist"
    assert (directory / "other" / "config.pbtxt").read_text() == 'name: "other"\n'
    assert sorted(p.name for p in directory.iterdir()) == ["fmnist", "other"]
    assert parse_config(directory / "fmnist" / "config.pbtxt").name == "fmnist"


def test_a_failed_write_leaves_nothing(exported, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    fresh, existing = tmp_path / "new" / "models", tmp_path / "models"
    existing.mkdir()
    for directory in (fresh, existing):
        with pytest.raises(FmnistError, match="No space left on device"):
            triton.write_model_repository(exported[0], directory)
    assert list(tmp_path.iterdir()) == [existing] and list(existing.iterdir()) == []   # no model, no temporary


def test_triton_without_onnx_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("export", "--triton", tmp_path / "models")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == "error: --triton writes a Triton model repository for the ONNX model: add --onnx"
    assert list(tmp_path.iterdir()) == []


def test_the_repository_writer_needs_neither_the_serve_extra_nor_torch():
    """`fmnist export --triton` imports fmnist.triton: in a new process where the serve extra's packages (starlette,
    uvicorn, prometheus_client, grpc) cannot be imported, it imports, and torch does not come in."""
    code = ("import sys; sys.modules.update(dict.fromkeys(['starlette', 'uvicorn', 'prometheus_client', 'grpc']))\n"
            "import fmnist.triton\n"
            "print('torch' in sys.modules)")
    reply = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout.strip() == "False"
