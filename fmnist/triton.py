"""A Triton Inference Server model repository for an exported ONNX model: the same verified file, a config.pbtxt
whose inputs and outputs are read off that file (so the two cannot disagree), and the class names as Triton's
labels file.

    DIR/fmnist/1/model.onnx     a byte-for-byte copy of the export
    DIR/fmnist/config.pbtxt     Triton's ModelConfig, in protobuf text format
    DIR/fmnist/labels.txt       the class names, one a line, in class-index order

Nothing here imports torch (nor tritonclient: the tests check the file against Triton's schema).
"""

import json
import os
import shutil
from pathlib import Path

import onnx

from fmnist import FmnistError, __version__
from fmnist.files import WriteError, missing_parents, prepare_out, remove_if_empty

MODEL_NAME = "fmnist"        # the model's folder, and its name in Triton's URLs: /v2/models/fmnist/infer
LABELS = "labels.txt"
# The largest batch Triton's dynamic batcher may build, and the most images one request may carry. 1024 is the
# largest batch fmnist measures (bench/README.md: inference at batch 1, 64 and 1024), and it pays: onnxruntime
# classifies several times as many images a second at batch 1024 as one at a time (bench/README.md, Serving: the
# "onnxruntime in-process" rows). A request at the limit is 3.2 MB of float32 pixels; larger batches
# were never measured and would only add to the wait of the requests queued behind one.
MAX_BATCH_SIZE = 1024
# How long the dynamic batcher holds a request to gather others into its batch: shorter than one image's own run
# (the same rows), so a single request waits less than its run takes.
MAX_QUEUE_DELAY_MICROSECONDS = 100

# ONNX tensor element types (onnx.TensorProto names) as Triton's model configuration writes them: the table in
# Triton's docs/user_guide/model_configuration.md, "Datatypes", column ONNX Runtime.
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FLOAT16": "TYPE_FP16", "FLOAT": "TYPE_FP32", "DOUBLE": "TYPE_FP64",
    "STRING": "TYPE_STRING",
}


def check_target(directory: str | Path) -> Path:
    """DIR/fmnist, once we know that writing it loses nothing: it is absent or an empty folder, in a place we
    can write. Called before the export too, so a refusal comes before the minute of fitting and verifying."""
    directory = prepare_out(directory)
    target = directory / MODEL_NAME
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise FmnistError(f"{target} already exists and is not empty; remove it, or choose another --triton folder")
    return target


def write_model_repository(onnx_path: str | Path, directory: str | Path) -> Path:
    """Write the model repository for the ONNX model at `onnx_path` into `directory`; returns DIR/fmnist.

    It is built in a temporary folder inside `directory` and renamed into place, so an interruption or a full
    disk leaves no half-written model for Triton to load, and a DIR/fmnist that is not empty is never touched.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FmnistError(f"ONNX model {onnx_path} not found; write one with `fmnist export --onnx`")
    target = check_target(directory)
    model = onnx.load(str(onnx_path), load_external_data=False)   # fmnist's exports are one self-contained file
    text, labels = model_config(model), "".join(f"{name}\n" for name in class_names(model))

    made = missing_parents(target.parent)   # to remove on failure: a failed command leaves no empty folder
    tmp = target.with_name(f".{MODEL_NAME}.tmp-{os.getpid()}")
    try:
        (tmp / "1").mkdir(parents=True)
        shutil.copyfile(onnx_path, tmp / "1" / "model.onnx")
        (tmp / "config.pbtxt").write_text(text)
        (tmp / LABELS).write_text(labels)
        os.replace(tmp, target)   # replaces an empty folder; fails on one that filled up since check_target
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(made)
        raise WriteError(f"{target}: cannot write the Triton model repository ({e.strerror or e}); "
                          "anything already there is kept") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def class_names(model: onnx.ModelProto) -> list[str]:
    """The class names `fmnist export` stored in the model's metadata (JSON), class i first."""
    names = {p.key: p.value for p in model.metadata_props}.get("classes")
    if names is None:
        raise FmnistError("this ONNX model has no class names in its metadata; export it with `fmnist export --onnx`")
    return json.loads(names)


def config(model: onnx.ModelProto) -> dict:
    """Triton's ModelConfig for the model, as JSON in the field names of Triton's model_config.proto: what
    config.pbtxt says (model_config() writes it from this) and what `fmnist serve` answers at
    GET /v2/models/fmnist/config, as Triton does for a repository (its model-configuration extension). Inputs and
    outputs as the ONNX graph declares them, without the batch axis (Triton adds it back: max_batch_size > 0);
    the first output, the logits, carries the labels."""
    initializers = {t.name for t in model.graph.initializer}   # listed among the inputs by old IR versions
    inputs = [_tensor(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_tensor(v) for v in model.graph.output]
    classes = class_names(model)
    if outputs[0][2] != [len(classes)]:
        raise FmnistError(f"the model's first output {outputs[0][0]!r} has shape {outputs[0][2]} per image, not one "
                          f"value for each of the {len(classes)} classes in its metadata; export it again")
    meta = {p.key: p.value for p in model.metadata_props}
    result: dict = {
        "name": MODEL_NAME, "platform": "onnxruntime_onnx", "max_batch_size": MAX_BATCH_SIZE,
        "input": [_entry(name, dtype, dims) for name, dtype, dims in inputs],
        "output": [_entry(name, dtype, dims, labels=i == 0) for i, (name, dtype, dims) in enumerate(outputs)],
        "dynamic_batching": {"max_queue_delay_microseconds": MAX_QUEUE_DELAY_MICROSECONDS},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}]}
    if "ood_threshold" in meta and "ood_score" in [o[0] for o in outputs]:
        result["parameters"] = {"ood_threshold": {"string_value": meta["ood_threshold"]}}
    return result


def read_config(onnx_path: str | Path) -> dict:
    """config() of the exported model at `onnx_path`."""
    return config(onnx.load(str(onnx_path), load_external_data=False))


# What config.pbtxt says above a field, for the person who reads it.
COMMENTS = {
    "max_batch_size": ["Triton's batch axis comes before each tensor's dims."],
    "instance_group": ["One instance on the CPU: onnxruntime already spreads one batch over every core. With a GPU,",
                       "make it kind: KIND_GPU (Triton's onnxruntime backend then runs the model with CUDA)."],
    "parameters": ["An image whose ood_score is above this is not a Fashion-MNIST item. The model's metadata has",
                   "it too; clients read it at GET /v2/models/fmnist/config. Triton's onnxruntime backend ignores it."],
}


def model_config(model: onnx.ModelProto) -> str:
    """config.pbtxt: config(model) in protobuf text format."""
    lines = ["# Triton model configuration for fmnist's exported model, written by `fmnist export --onnx --triton`",
             f"# (fmnist {__version__}). Inputs and outputs are read off 1/model.onnx; see README.md, Serving."]
    for key, value in config(model).items():
        lines += [f"# {line}" for line in COMMENTS.get(key, [])] + _text_field(key, value, "")
    return "\n".join(lines) + "\n"


def _text_field(key: str, value: object, indent: str) -> list[str]:
    """One field of a message in protobuf text format: a message as `key { ... }`, a repeated message as
    `key [ {...}, {...} ]`, a repeated number as `key: [ 1, 28 ]`; the parameters map as Triton writes it."""
    if key == "parameters":   # map<string, ModelParameter>
        return [f"{indent}parameters {{ key: {json.dumps(k)} "
                f"value: {{ string_value: {json.dumps(v['string_value'])} }} }}"
                for k, v in value.items()]   # type: ignore[attr-defined]
    if isinstance(value, dict):
        return [f"{indent}{key} {{", *(line for k, v in value.items() for line in _text_field(k, v, indent + "  ")),
                f"{indent}}}"]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        items = [[f"{indent}  {{", *(line for k, v in item.items() for line in _text_field(k, v, indent + "    ")),
                  f"{indent}  }}"] for item in value]
        return [f"{indent}{key} [", *(line for i, item in enumerate(items)
                                      for line in item[:-1] + [item[-1] + ("," if i < len(items) - 1 else "")]),
                f"{indent}]"]
    if isinstance(value, list):
        return [f"{indent}{key}: [ {', '.join(map(str, value))} ]" if value else f"{indent}{key}: [ ]"]
    if isinstance(value, str) and not value.startswith(("TYPE_", "KIND_")):   # enums are written bare
        value = json.dumps(value)
    return [f"{indent}{key}: {value}"]


def _tensor(value: onnx.ValueInfoProto) -> tuple[str, str, list[int]]:
    """(name, Triton data type, dims without the batch axis; -1 for any other axis of no fixed size)."""
    tensor = value.type.tensor_type
    element = onnx.TensorProto.DataType.Name(tensor.elem_type)
    if element not in TRITON_TYPES:
        raise FmnistError(f"the model's {value.name!r} is {element}, which Triton's onnxruntime backend does not take")
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not shape or shape[0] != -1:
        raise FmnistError(f"the model's {value.name!r} has no batch axis of free size (shape {shape}); "
                          "export it again with `fmnist export --onnx`")
    return value.name, TRITON_TYPES[element], shape[1:]


def _entry(name: str, dtype: str, dims: list[int], labels: bool = False) -> dict:
    """One input or output. A tensor that is one value per image, (batch,) in the model, is dims [1] reshaped
    to [] for the model: Triton allows no empty dims (docs/user_guide/model_configuration.md, "Reshape"), and
    its onnxruntime backend writes such an output the same way when it completes a configuration itself."""
    entry: dict = {"name": name, "data_type": dtype, "dims": dims or [1]}
    if not dims:
        entry["reshape"] = {"shape": []}
    if labels:
        entry["label_filename"] = LABELS
    return entry
