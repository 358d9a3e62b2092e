"""bench/report.py: the table of several benchmark files, as bench/gpu.sh writes them (one per path)."""

import json

from bench import report

MACHINE = {"cpu": {"brand_raw": "Some CPU"}, "processor": "x86_64", "cores": 16, "gpu": "Some GPU",
           "versions": {"torch": "2.11.0"}}


def run(*rows) -> dict:
    """A pytest-benchmark JSON file's content, with rows (group, path, device, batch size, samples/s)."""
    return {"machine_info": MACHINE, "datetime": "2026-11-27T12:00:00", "benchmarks": [
        {"group": group, "name": f"{path}-{device}-{batch}", "extra_info": {
            "path": path, "device": device, "batch_size": batch, "samples_per_second": speed}}
        for group, path, device, batch, speed in rows]}


def test_ratios_are_taken_to_the_baseline_in_another_file(tmp_path, capsys):
    cuda = tmp_path / "bench-train-eager.json"
    cuda.write_text(json.dumps(run(("train", "fmnist loop, eager", "cuda", 100, 300_000),
                                   ("train", "fmnist loop, eager", "cuda", 1000, 900_000))))
    baseline = tmp_path / "bench-train-baseline.json"
    baseline.write_text(json.dumps(run(("train", "tutorial DataLoader loop", "cpu", 100, 20_000))))
    cut_off = tmp_path / "bench-train-compiled.json"
    cut_off.write_text("")   # pytest-benchmark truncates the file first: a run killed by its limit leaves it so
    report.main([str(cuda), str(baseline), str(cut_off)])
    table = capsys.readouterr().out
    assert "16 cores, GPU: Some GPU; torch 2.11.0." in table
    assert "| train | fmnist loop, eager | cuda | 100 | 300,000 | 15.00 |" in table
    assert "| train | fmnist loop, eager | cuda | 1000 | 900,000 | - |" in table   # no baseline at batch 1000
    assert "| train | tutorial DataLoader loop | cpu | 100 | 20,000 | 1.00 |" in table
    assert f"No rows (none ran, or the run was cut off): {cut_off}" in table


def test_pytest_shows_skip_reasons(tmp_path):
    """The README says that skipped tests are shown with the reason: pyproject.toml's addopts asks for it (-rs)."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_skipping.py").write_text("import pytest\n\n\ndef test_it():\n    pytest.skip('no GPU here')\n")
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    result = subprocess.run([sys.executable, "-m", "pytest", "-c", str(pyproject), "--rootdir", str(tmp_path),
                             "-p", "no:cacheprovider", str(tmp_path / "test_skipping.py")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert "SKIPPED [1] test_skipping.py:5: no GPU here" in result.stdout


NO_CUDA = "no CUDA device on this machine"


def test_the_run_ends_with_a_plain_summary():
    rows = report.with_ratios(run(
        ("train", "tutorial DataLoader loop", "cpu", 100, 20_000), ("train", "fmnist loop, eager", "cpu", 100, 44_000),
        ("train", "fmnist loop, compiled", "cpu", 100, 50_000), ("train", "fmnist loop, eager", "cpu", 1000, 90_000),
        ("inference", "torch eager", "cpu", 1, 8_500), ("inference", "onnxruntime", "cpu", 1, 54_400),
        ("inference", "onnxruntime", "cpu", 64, 200_000),
        ("inference", "torch eager", "cuda", 1, 30_000))["benchmarks"])
    assert report.plain_summary(rows) == ("fmnist's loop: 2.2× the tutorial's at batch 100; "
                                          "onnxruntime: 6.4× eager torch at batch 1")
    assert report.plain_summary(rows[:4]) == "fmnist's loop: 2.2× the tutorial's at batch 100"   # no inference ran
    assert report.plain_summary([]) is None


class Skipped:
    """A skipped test's or module's report, as pytest keeps it (nodeid, longrepr: file, line, 'Skipped: why')."""

    def __init__(self, nodeid, reason):
        self.nodeid, self.longrepr = nodeid, ("bench/common.py", 19, f"Skipped: {reason}")


def test_the_skipped_groups_are_named_once_with_the_reason():
    serve = "fmnist serve needs the extra: pip install 'fmnist[serve]'"
    reports = [Skipped(f"bench/test_train_speed.py::test_fmnist_loop[{n}]", NO_CUDA) for n in range(4)] + [
        Skipped("bench/test_inference_speed.py::test_torch_cuda[1]", NO_CUDA),
        Skipped("bench/test_serve_speed.py", serve)]   # importorskip: the module itself
    groups = {f"bench/test_train_speed.py::test_fmnist_loop[{n}]": "train" for n in range(4)}
    groups["bench/test_inference_speed.py::test_torch_cuda[1]"] = "inference"
    assert report.skipped_summary(reports, groups) == [
        f"skipped, {NO_CUDA}: train (4), inference (1)",
        f"skipped, {serve}: bench/test_serve_speed.py (all of it)"]
    assert report.skipped_summary([], groups) == []
