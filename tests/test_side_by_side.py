"""bench/side_by_side.py: runs side by side against one run on every thread, in-process on onnxruntime."""

import pytest


def test_side_by_side_gives_a_row_of_rates_for_each_size(exported, capsys):
    """One round at two sizes: a row for each, four positive rates in the order of WAYS."""
    from bench import side_by_side

    side_by_side.main([str(exported[0]), "--sizes", "2,8", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| images a run | " + " | ".join(side_by_side.WAYS) + " |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[4:]]
    assert [row[0] for row in rows] == ["2", "8"]
    assert all(len(row) == 5 and all(float(rate.replace(",", "")) > 0 for rate in row[1:]) for row in rows)


def test_rate_counts_the_images_of_every_thread(exported):
    """Images/s over threads at once: each thread's runs count, so that rates side by side compare with one."""
    import numpy as np

    from bench import side_by_side
    from fmnist import runtime

    session = runtime.session(exported[0], threads=1, spinning=False)
    calls = []

    class Counting:
        def get_outputs(self):
            return session.get_outputs()

        def get_inputs(self):
            return session.get_inputs()

        def run(self, outputs, feed):
            calls.append(len(feed[session.get_inputs()[0].name]))
            return session.run(outputs, feed)

    images = np.zeros((100, 1, 28, 28), np.float32)
    side_by_side.rate(Counting(), images, side_by_side=4)
    assert sum(calls) == 100 + side_by_side.IMAGES_A_ROUND   # one warm run, then 20,000 images in all


@pytest.mark.parametrize("args, words", [(["--sizes", "a,b"], "whole numbers"), (["--sizes", "0"], "1 or more"),
                                         (["--rounds", "0"], "1 or more")])
def test_bad_arguments_get_one_line(args, words, capsys):
    from bench import side_by_side

    with pytest.raises(SystemExit) as stop:
        side_by_side.main(["export/fmnist.onnx", *args])
    assert stop.value.code == 2 and words in capsys.readouterr().err


def test_a_missing_model_is_one_line(tmp_path):
    from bench import side_by_side

    with pytest.raises(SystemExit, match="not found") as stop:
        side_by_side.main([str(tmp_path / "none.onnx"), "--sizes", "1", "--rounds", "1"])
    assert "fmnist export --onnx" in str(stop.value.code)
