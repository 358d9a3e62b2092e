"""The real peer: Triton's tritonserver and perf_analyzer, from PyPI, in their own virtual environment
(bench/triton/setup.sh makes it in .triton/; FMNIST_TRITON_VENV names another). None of this is fmnist's
package: these are the tools the tests and the benchmark start beside `fmnist serve`.

    tools()                          where the binaries are, or why they cannot be had
    triton(repository)               a real tritonserver serving `fmnist export --triton`'s repository
    perf_analyzer(tools, url, ...)   Triton's own load generator against any v2 server; its CSV row

Triton's onnxruntime backend is not on PyPI, so tritonserver runs the same model.onnx through its python
backend (model.py beside this file): the repository is copied with `platform: "onnxruntime_onnx"` swapped for
`backend: "python"`, everything else (labels, dynamic batching, dims and reshape, parameters) as written.
"""

import contextlib
import csv
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

HERE = Path(__file__).parent
VENV = Path(os.environ.get("FMNIST_TRITON_VENV", HERE.parent.parent / ".triton"))
SITE = VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
SERVER = SITE / "pytriton" / "tritonserver"


@dataclass(frozen=True)
class Tools:
    perf_analyzer: Path
    tritonserver: Path
    environment: dict   # the environment both run in: LD_LIBRARY_PATH for the libraries they load


def tools() -> "Tools | str":
    """The binaries, or why they cannot be had (a string, the reason a test skips with)."""
    found = Tools(VENV / "bin" / "perf_analyzer", SERVER / "bin" / "tritonserver", {})
    missing = [str(path) for path in (found.perf_analyzer, found.tritonserver) if not path.exists()]
    if missing:
        return f"needs Triton's tools ({', '.join(missing)} absent): bash bench/triton/setup.sh"
    # perf_analyzer needs libcudart.so.12 (it loads it even without a GPU); tritonserver its own libraries and
    # the python backend's stub this Python's libpython (Debian's would fail: '_thread.RLock' object has no
    # attribute '_recursion_count').
    libraries = [SITE / "nvidia" / "cuda_runtime" / "lib", SITE / "nvidia_pytriton.libs",
                 sysconfig.get_config_var("LIBDIR")]
    return Tools(found.perf_analyzer, found.tritonserver,
                 {**os.environ, "LD_LIBRARY_PATH": ":".join(map(str, libraries))})


def python_backend_repository(repository: Path, into: Path) -> Path:
    """A copy of `fmnist export --triton`'s repository that Triton's python backend serves (the platform line
    swapped, model.py beside model.onnx), and the backend folder for --backend-directory: the backend and the
    stub for this Python. Returns the repository's copy."""
    target = into / "models"
    shutil.copytree(repository, target)
    config = target / "fmnist" / "config.pbtxt"
    text, swapped = re.subn(r'^platform: "onnxruntime_onnx"$', 'backend: "python"', config.read_text(), flags=re.M)
    assert swapped == 1, "config.pbtxt has no onnxruntime platform line"
    config.write_text(text)
    shutil.copy(HERE / "model.py", target / "fmnist" / "1" / "model.py")
    backend = into / "backends" / "python"
    shutil.copytree(SERVER / "backends" / "python", backend)
    shutil.copy(SERVER / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" /
                "triton_python_backend_stub", backend)
    # The stub runs this Python's interpreter isolated (no PYTHONPATH, no virtual environment): the first module
    # it imports is told where the Triton environment's onnxruntime and numpy are (pytriton's numpy 1.26:
    # beside numpy 2 the stub sent every output back empty, seen here).
    utils = backend / "triton_python_backend_utils.py"
    utils.write_text(f"import sys\nsys.path.insert(0, {str(SITE)!r})\n" + utils.read_text())
    return target


@dataclass(frozen=True)
class Running:
    url: str                          # http://127.0.0.1:PORT
    grpc: str                         # 127.0.0.1:PORT
    process: subprocess.Popen


@contextlib.contextmanager
def triton(found: Tools, repository: Path, timeout: float = 120) -> Iterator[Running]:
    """A real tritonserver on loopback ports serving the repository (through the python backend), until the
    block ends."""
    with tempfile.TemporaryDirectory(prefix="fmnist-triton-") as folder:
        models = python_backend_repository(Path(repository), Path(folder))
        http, grpc, metrics = free_port(), free_port(), free_port()
        log = open(Path(folder) / "tritonserver.log", "w")
        process = subprocess.Popen(
            [str(found.tritonserver), "--model-repository", str(models), "--backend-directory",
             str(Path(folder) / "backends"), "--http-address", "127.0.0.1", "--http-port", str(http),
             "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc), "--metrics-port", str(metrics),
             "--allow-metrics", "false", "--log-verbose", "0"],
            env=found.environment, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{http}"
        try:
            wait_ready(url, process, timeout, Path(folder) / "tritonserver.log")
            yield Running(url, f"127.0.0.1:{grpc}", process)
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def wait_ready(url: str, process: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/v2/models/fmnist/ready", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            said = "\n".join(line for line in log.read_text().splitlines() if line.startswith("E"))[-3000:] \
                if log else ""
            raise RuntimeError(f"the server at {url} did not become ready: {said}")
        time.sleep(0.2)


def perf_analyzer(found: Tools, url: str, *, batch: int = 1, concurrency: int = 1, requests: int = 200,
                  protocol: str = "http", tensors: str = "binary", data: str = "zero",
                  timeout: float = 120) -> dict[str, float]:
    """Triton's perf_analyzer against the v2 server at `url` ("http://host:port"), until its measurement is
    stable: the CSV row it writes, as numbers (Inferences/Second, p50 latency ... in microseconds). `data`:
    zeros as the images, or "random", its default, which fmnist refuses (random bytes as float32 are NaN,
    infinity and numbers far outside [0, 1]: not pixels)."""
    with tempfile.TemporaryDirectory(prefix="fmnist-perf-") as folder:
        out = Path(folder) / "perf.csv"
        command = [str(found.perf_analyzer), "-m", "fmnist", "-u", url.removeprefix("http://"), "-i", protocol,
                   "-b", str(batch), "--shape", "images:1,28,28", "--input-data", data,
                   "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
                   "--measurement-request-count", str(requests), "--stability-percentage", "100",
                   "--max-trials", "10", "-f", str(out)]
        if protocol == "http":
            command += ["--input-tensor-format", tensors, "--output-tensor-format", tensors]
        done = subprocess.run(command, env=found.environment, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"perf_analyzer failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
        with open(out) as f:
            [row] = list(csv.DictReader(f))
        return {key: float(value) for key, value in row.items()}
