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
