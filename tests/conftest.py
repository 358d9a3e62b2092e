import os
import time

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="session")
def trained(real_data, tmp_path_factory):
    """One real `fmnist train --epochs 1` run through the CLI, shared by the tests that need a trained model."""
    from fmnist.cli import app

    out = tmp_path_factory.mktemp("trained")
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["train", "--epochs", "1", "--out", str(out), "--device", "cpu"])
    result.wall_seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="session")
def exported(trained):
    """The trained run exported through the CLI: (path of the ONNX model, the command's Result)."""
    out, _ = trained
    result = run_cli("export", "--onnx", "--checkpoint", out / "fmnist.pt", "--output", out / "m.onnx")
    assert result.exit_code == 0, result.output
    return out / "m.onnx", result


def run_cli(*args: str):
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr, output)."""
    from fmnist.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test downloads: where the data is missing, fmnist says so instead of trying torchvision's download."""
    monkeypatch.setenv("FMNIST_OFFLINE", "1")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`fmnist serve` running as its own process (real uvicorn) on a free loopback port."""

    def __init__(self, onnx, *options: str, timeout: float = 60):
        import subprocess
        import sys
        import urllib.request

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = 0 if "--grpc-port" in options else free_port()   # never the default 8001: tests run beside
        self.grpc = f"127.0.0.1:{self.grpc_port}"                         # each other
        grpc = ["--grpc-port", str(self.grpc_port)] if self.grpc_port else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fmnist.cli", "serve", "--onnx", str(onnx), "--port", str(self.port), *grpc,
             *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fmnist serve did not start: {self.process.stdout.read()}")
            time.sleep(0.1)

    def stop(self, signal=None) -> str:
        """Stop it (Ctrl-C's SIGINT unless told), and return what it printed."""
        import signal as signals

        if self.process.poll() is None:
            self.process.send_signal(signal or signals.SIGINT)
            try:
                self.process.wait(timeout=20)
            except Exception:
                self.process.kill()
                self.process.wait()
        return self.process.stdout.read()


@pytest.fixture(scope="session")
def server(exported):
    """The exported model behind `fmnist serve` (one process for the session): its Server (url, port)."""
    running = Server(exported[0])
    yield running
    running.stop()


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server (.ci/run starts one): FMNIST_TEST_POSTGRES, else fmnist's CI database. Absent:
    the test is skipped, except under CI, where it fails."""
    url = os.environ.get("FMNIST_TEST_POSTGRES", "postgresql://fmnist:fmnist@127.0.0.1:5432/fmnist")
    try:
        import sqlalchemy

        from fmnist.sweep import study as studies

        with sqlalchemy.create_engine(studies._with_driver(url)).connect():
            pass
    except Exception as e:
        reason = f"needs a PostgreSQL server at {url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must have PostgreSQL running (.ci/run starts it): {reason}")
        pytest.skip(reason)
    return url
