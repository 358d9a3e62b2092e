"""bench/score_cost.py: what ood_score costs beside the Network alone, timed interleaved."""

import onnx
import pytest


def test_score_cost_times_each_model_and_gives_its_ratio_to_the_network_alone(trained, real_data, capsys):
    """bench/score_cost.py end to end, one round, on the shared one-epoch checkpoint: a row for each batch size,
    and each ratio the quotient of the two images/s it prints (not, say, the other way round)."""
    from bench import score_cost

    score_cost.main([str(trained[0] / "fmnist.pt"), "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert [int(row[0]) for row in rows] == list(score_cost.BATCH_SIZES)
    assert lines[2].startswith("| batch | Network alone images/s | with ood_score images/s |")
    for _, alone, whole, ratio in rows:
        alone, whole = (float(v.replace(",", "")) for v in (alone, whole))
        assert alone > 0 and whole > 0
        assert float(ratio.rstrip("x")) == pytest.approx(whole / alone, abs=0.006)   # both printed rounded


def test_the_two_models_timed_are_the_network_alone_and_the_whole_exported_model(trained, real_data, tmp_path):
    from bench import score_cost

    models = score_cost.exported(str(trained[0] / "fmnist.pt"), tmp_path)
    outputs = {name: [o.name for o in onnx.load(str(path)).graph.output] for name, path in models.items()}
    assert outputs == {"Network alone": ["logits"], "with ood_score": ["logits", "ood_score"]}


@pytest.mark.parametrize("args, words", [
    (["--rounds", "0"], "--rounds: give 1 or more"),
    (["--compare", "a/m.onnx", "b/m.onnx"], "--compare: give files of different names"),
])
def test_bad_arguments_are_one_line_before_any_work(args, words, capsys):
    from bench import score_cost

    with pytest.raises(SystemExit) as stop:
        score_cost.main(["no-such-checkpoint.pt", *args])   # refused before the checkpoint is read
    assert stop.value.code == 2 and words in capsys.readouterr().err
