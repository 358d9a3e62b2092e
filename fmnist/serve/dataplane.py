"""The data plane: the serving work that both transports share, in the manner of KServe's DataPlane. Parse and
check a request (fmnist.serve.protocol), batch and run it (the batcher, over fmnist.runtime's onnxruntime
sessions), answer it, and keep the statistics. It knows no transport: it takes bytes and protocol messages, returns
plain data, and raises fmnist.serve.errors' errors, which fmnist.serve.rest and fmnist.serve.rpc each map once.
"""

import asyncio
import base64
import io
import os
import time
from collections.abc import Callable
from typing import IO, TypeVar

import numpy as np
from PIL import Image

from fmnist import __version__, runtime, triton
from fmnist.serve import protocol
from fmnist.serve.batching import Batcher, Timed
from fmnist.serve.errors import InvalidInput, ModelNotFound
from fmnist.serve.statistics import Statistics

R = TypeVar("R")
MODEL, VERSION = triton.MODEL_NAME, "1"   # the model's name and only version on the /v2 routes, as in its Triton
                                         # repository (`fmnist export --triton`)

# Limits, each with its reason. Past them a request gets a 4xx (or 503) that says which, never a dead server.
# (The body's limit is Settings.max_body_mb, the queue's Settings.max_queue.)
MAX_IMAGES = 4096           # images in one request: 4096 x 3 KiB of FP32 is 12 MiB, well within the body limit
MAX_FILES = 64              # files in one /predict upload: each is decoded in full before it is shrunk to 28 x 28
MAX_PIXELS = 40_000_000     # pixels in one uploaded image (a 40-megapixel photo decodes to ~120 MB of RGB):
                            # a small PNG can claim billions, a decompression bomb; refused before decoding


# Runs of fewer images than this go to a second session of one thread: a few images are over before the other
# threads have woken (two threads win from 16 images on), and under load, when the cores are busy with the
# requests themselves, waking them costs more (perf_analyzer; bench/README.md, Serving).
ONE_THREAD_BELOW = 16


class Model:
    """The onnxruntime sessions and what the routes need to know about the model, loaded once per process."""

    def __init__(self, onnx: str, threads: int) -> None:
        self.session = runtime.session(onnx, threads=threads, spinning=False)
        self.small = runtime.session(onnx, threads=1, spinning=False) if threads != 1 else self.session
        # Runs at once, as many as the process has threads for: a batch that comes while another runs goes beside it
        # on a thread of its own (run_beside), which answers more images than waiting for one run on every thread
        # (bench/README.md, Serving).
        self.runners = threads or os.cpu_count() or 1
        self.classes = runtime.class_names(self.session)
        self.threshold = runtime.ood_threshold(self.session)
        [image_input] = self.session.get_inputs()
        self.input_name = image_input.name
        self.input_shape = tuple(d if isinstance(d, int) else -1 for d in image_input.shape)
        self.outputs = [o.name for o in self.session.get_outputs()]
        # Triton's configuration of the model, the one `fmnist export --triton` writes: the config route's answer,
        # and each output's dims, which give the same shapes as Triton's (ood_score (N, 1), not the graph's (N,)).
        self.config = triton.read_config(onnx)
        self.output_dims = {output["name"]: output["dims"] for output in self.config["output"]}

    def shaped(self, values: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        """The outputs by name, each (N, *dims) as the configuration says."""
        return {name: value.reshape(len(value), *self.output_dims[name])
                for name, value in zip(self.outputs, values, strict=True)}

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        session = self.small if len(images) < ONE_THREAD_BELOW else self.session
        return tuple(session.run(self.outputs, {self.input_name: images}))

    def run_beside(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """A run made while others are under way: on its own thread, one of the process's share."""
        return tuple(self.small.run(self.outputs, {self.input_name: images}))

    def metadata(self) -> dict:
        """The protocol's model metadata; `parameters` adds the class names and the out-of-distribution
        threshold, which the protocol has no field for."""
        tensor = lambda name, shape: {"name": name, "datatype": "FP32", "shape": shape}   # noqa: E731
        parameters: dict[str, object] = {"classes": self.classes}
        if self.threshold is not None:
            parameters["ood_threshold"] = self.threshold
        return {"name": MODEL, "versions": [VERSION], "platform": "onnxruntime_onnx",
                "inputs": [tensor(self.input_name, list(self.input_shape))],
                "outputs": [tensor(name, [-1, *self.output_dims[name]]) for name in self.outputs],
                "parameters": parameters}


class DataPlane:
    """The work of every request, over either transport. The model and its batcher come from load(), which the
    server calls when it starts: once per process, never per request."""

    model: Model
    batcher: Batcher

    def __init__(self, statistics: Statistics) -> None:
        self.statistics = statistics

    def load(self, model: Model, batcher: Batcher) -> None:
        self.model, self.batcher = model, batcher

    # ---- the Open Inference Protocol (KServe v2) ------------------------------------------------------------

    async def server_metadata(self) -> dict:
        return {"name": "fmnist", "version": __version__,
                "extensions": ["binary_tensor_data", "classification", "model_configuration", "statistics"]}

    async def live(self) -> dict:
        return {"live": True}

    async def ready(self) -> dict:
        return {"ready": hasattr(self, "model")}

    async def model_metadata(self, name: str, version: str | None = None) -> dict:
        return self.named_model(name, version).metadata()

    async def model_ready(self, name: str, version: str | None = None) -> dict:
        self.named_model(name, version)
        return {"name": MODEL, "ready": True}

    async def model_config(self, name: str, version: str | None = None) -> dict:
        """Triton's model-configuration extension: the configuration config.pbtxt holds, as Triton answers it."""
        return self.named_model(name, version).config

    async def model_statistics(self, name: str, version: str | None = None) -> dict:
        """Triton's statistics extension (fmnist.serve.statistics)."""
        self.named_model(name, version)
        return self.statistics.json()

    async def infer_with(self, name: str, version: str | None,
                         parse: Callable[[], tuple[protocol.InferenceRequest, bytes]],
                         reply: Callable[[protocol.InferenceRequest, list[protocol.WantedOutput],
                                          dict[str, np.ndarray]], R]) -> R:
        """An inference request over either transport: `parse` gives the protocol's request and its binary
        bytes (REST's body, or gRPC's message in the same form), `reply` writes the answer. The same checks,
        batcher and statistics for both; each stage timed for the statistics extension."""
        model = self.named_model(name, version)
        arrived = time.perf_counter()
        try:
            inference, binary = parse()
            images = protocol.input_tensor(inference, binary, model.input_name, model.input_shape, "FP32")
            if len(images) == 0:
                raise InvalidInput(f"input {model.input_name!r}: no images (the shape's first number is 0)")
            wanted = protocol.wanted_outputs(inference, model.outputs)
            parsed = time.perf_counter()
            timed = await self._classify(images)
            ran = time.perf_counter()
            answer = reply(inference, wanted, model.shaped(timed.outputs))
        except Exception:
            self.statistics.observe_request(False, time.perf_counter() - arrived)
            raise
        done = time.perf_counter()
        self.statistics.observe_request(True, done - arrived, timed.queue, parsed - arrived, timed.infer, done - ran)
        return answer

    # ---- for people: image files ----------------------------------------------------------------------------

    async def predict(self, uploads: list[tuple[str, IO[bytes]]], top: int | None = None,
                      invert: bool | None = None) -> list:
        """Image files (name, file) in, `fmnist predict --json`'s answer out, each with the 28 x 28 image the
        network saw. top: how many classes each lists (runtime.TOP if None)."""
        top = runtime.TOP if top is None else top
        if not 1 <= top <= runtime.MAX_TOP:
            raise InvalidInput(f"top={top}: must be 1 to {runtime.MAX_TOP}")
        if not uploads:
            raise InvalidInput("no image files: send them as multipart/form-data in the field `files`, e.g. "
                               "curl -F files=@shirt.jpg http://127.0.0.1:8000/predict")
        prepared = [await asyncio.to_thread(runtime.load_image, file, invert, name, MAX_PIXELS)
                    for name, file in uploads]
        outputs = (await self._classify(np.concatenate([image.input for image in prepared]))).outputs
        scores = outputs[1] if self.model.threshold is not None else None
        results = runtime.predictions_from(outputs[0], scores, self.model.classes, self.model.threshold, top)
        return [{**runtime.answer(name, image, result), "input": png_data_url(image.input)}
                for (name, _), image, result in zip(uploads, prepared, results, strict=True)]

    # ---- shared by the requests ------------------------------------------------------------------------------

    def named_model(self, name: str, version: str | None) -> Model:
        """The model a request names: ModelNotFound for any other name or version."""
        if name != MODEL:
            raise ModelNotFound(f"unknown model {name!r}: this server serves {MODEL!r}")
        if version not in (None, VERSION):
            raise ModelNotFound(f"model {MODEL!r} has no version {version!r}; it has {VERSION!r}")
        return self.model

    async def _classify(self, images: np.ndarray) -> Timed:
        if len(images) > MAX_IMAGES:
            raise InvalidInput(f"{len(images)} images in one request; send at most {MAX_IMAGES} per request")
        return await self.batcher.timed(images)


def png_data_url(image: np.ndarray) -> str:
    """A model input (1, 1, 28, 28) in [0, 1] as a PNG data URL: what the network saw, for a page to show."""
    buffer = io.BytesIO()
    Image.fromarray((image[0, 0] * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
