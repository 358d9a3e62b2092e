"""Triton's python backend running fmnist's model.onnx on onnxruntime: Triton's own onnxruntime backend is not on
PyPI, so the real tritonserver of the comparison (bench/triton/peer.py) serves the same file this way. One
onnxruntime run per dynamic batch; each output shaped as config.pbtxt's dims say, as the onnxruntime backend does."""

import triton_python_backend_utils as pb_utils  # first: peer.py's copy puts the Triton environment on sys.path

# isort: split
import json
import os

import numpy as np
import onnxruntime


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"),
                                                    providers=["CPUExecutionProvider"])
        self.input = config["input"][0]["name"]
        self.outputs = {o["name"]: [int(d) for d in o["dims"]] for o in config["output"]}

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        values = self.session.run(list(self.outputs), {self.input: np.concatenate(images)})
        responses, start = [], 0
        for batch in images:
            end = start + len(batch)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value[start:end].reshape(-1, *dims)))
                       for (name, dims), value in zip(self.outputs.items(), values, strict=True)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = end
        return responses
