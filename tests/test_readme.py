"""The commands of the README, CONTRIBUTING.md and the docs site's pages, as a person pastes them: each fmnist
command parses as fmnist's own options, no page tells two runs to train into one folder, the install lines name
real extras, the Python blocks run, and the serving examples work against a real `fmnist serve`. (CI runs the
quick start itself: .ci/run installs in a new venv, trains and exports.)"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_cli import run_cli_wide

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text()
         for path in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]}
EVERY_PAGE = "\n".join(PAGES.values())


def blocks(language: str, text: str = EVERY_PAGE) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def lines(block: str) -> list[str]:
    """A shell block's command lines: comments off, backslash continuations and quoted newlines joined."""
    joined, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending += ("\n" if pending else "") + line
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:   # a quote still open: the command goes on on the next line
            continue
        if words:
            joined.append(pending)
        pending = ""
    assert not pending, f"unclosed quote in {pending!r}"
    return joined


def commands(line: str) -> list[list[str]]:
    """The commands of one line, split at && and |, as word lists."""
    words, current, out = shlex.split(line, comments=True), [], []
    for word in words:
        if word in ("&&", "|"):
            out.append(current)
            current = []
        else:
            current.append(word)
    return out + [current]


def fmnist_commands(text: str = EVERY_PAGE) -> list[list[str]]:
    return [words for block in blocks("sh", text) for line in lines(block) for words in commands(line)
            if words and words[0] == "fmnist"]


def parsed(words: list[str]):
    """click's context for an fmnist command line, made as the CLI makes it, without running the command: every
    option exists, takes its value, and converts to its type."""
    from typer.main import get_command

    from fmnist.cli import app

    group = get_command(app)
    command = group.get_command(group.make_context("fmnist", [], resilient_parsing=True), words[1])
    assert command is not None, f"no command {words[1]!r}: {shlex.join(words)}"
    return command.make_context(words[1], words[2:])


def test_the_readme_has_the_commands_a_newcomer_needs():
    named = {words[1] for words in fmnist_commands(README)}
    assert {"train", "export", "evaluate", "predict", "sweep", "serve"} <= named
    assert commands(lines(blocks("sh", README)[0])[0]) == [["python3", "-m", "venv", ".venv"],
                                                             [".", ".venv/bin/activate"]]
    assert len(README.splitlines()) <= 250
    assert "pytest" in "\n".join(README.splitlines()[:25]) and "fmnist train" in "\n".join(README.splitlines()[:25])


def test_the_docs_site_has_the_pages_the_readme_links_to():
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)", README))
    assert linked == {name for name in PAGES if name.startswith("docs/")} - {"docs/index.md"}
    assert {"docs/training.md", "docs/onnx.md", "docs/serving.md", "docs/sweeps.md", "docs/benchmarks.md",
            "docs/testing.md", "docs/design.md", "docs/getting-started.md"} <= set(linked)


def test_the_training_page_lists_every_learned_option_with_both_recipes_defaults():
    """docs/training.md's table of what is learned: a row for each TrainConfig field a run learns with, giving
    the defaults the two recipes really have."""
    from fmnist.config import LEARNED, recipe

    rows = {cells[0]: cells[1:3] for line in PAGES["docs/training.md"].splitlines() if line.startswith("| `--")
            for cells in [[cell.strip().strip("`") for cell in line.strip("|").split("|")]]}

    def shown(value) -> str:
        return "off" if value is False else "on" if value is True else f"{value:g}" if isinstance(value, float) \
            else str(value)

    for name in LEARNED:
        flag = "--" + name.replace("_", "-")
        row = rows.get(flag) or rows.get(f"{flag}/--no-{flag[2:]}")
        assert row, f"docs/training.md has no row for {flag}"
        assert row == [shown(getattr(recipe(kind), name)) for kind in ("tuned", "seed")], (flag, row)


@pytest.mark.parametrize("words", fmnist_commands(), ids=shlex.join)
def test_every_fmnist_command_in_the_readme_parses(words):
    parsed(words)


@pytest.mark.parametrize("page", PAGES)
def test_no_two_runs_of_a_page_train_into_one_folder(page):
    """Pasted in order, a second fresh `fmnist train` into a folder that holds a run is refused; so is a sweep of
    other values into another sweep's folder. Each page is read as one session."""
    seen: dict[tuple[str, Path], list[str]] = {}
    for words in fmnist_commands(PAGES[page]):
        if words[1] not in ("train", "sweep"):
            continue
        params = parsed(words).params
        if params.get("resume") or params.get("overwrite") or params.get("show"):
            continue
        key = (words[1], Path(params["out_dir"]))
        assert key not in seen or seen[key] == words, f"{shlex.join(words)} into the folder of {shlex.join(seen[key])}"
        seen[key] = words
    if page == "README.md":
        assert ("train", Path("export-seed")) in seen


def test_the_pip_lines_name_extras_that_exist():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = re.findall(r'pip install[^\n]*?"(?:fmnist|\.)\[([\w,]+)\]"', EVERY_PAGE)
    assert named and all(set(group.split(",")) <= extras for group in named), (named, extras)


def test_the_seed_run_and_the_photo_it_makes_are_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    checked = subprocess.run(["git", "check-ignore", "--no-index", "export-seed/fmnist.pt", "boot.jpg"], cwd=ROOT,
                             capture_output=True, text=True)
    assert checked.stdout.split() == ["export-seed/fmnist.pt", "boot.jpg"]


def shell(line: str, cwd: Path, port: int) -> subprocess.CompletedProcess:
    """One of the README's command lines in bash, as pasted, against the test's server instead of port 8000."""
    line = line.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120)


@pytest.fixture
def readme_folder(tmp_path, trained, exported):
    """A folder laid out as the README's commands leave it: export/fmnist.pt and export/fmnist.onnx (the tests'
    one-epoch run), then boot.jpg, made by the README's own line."""
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "fmnist.pt").symlink_to(trained[0] / "fmnist.pt")
    (tmp_path / "export" / "fmnist.onnx").symlink_to(exported[0])
    [make_photo] = {line for block in blocks("sh") for line in lines(block) if "boot.jpg" in line and "python" in line}
    made = shell(make_photo, tmp_path, 0)
    assert made.returncode == 0 and (tmp_path / "boot.jpg").is_file(), made.stderr
    return tmp_path


def test_the_readmes_predict_and_evaluate_run_as_written(readme_folder, monkeypatch):
    monkeypatch.chdir(readme_folder)
    for words in fmnist_commands():
        if words[1] in ("predict", "evaluate"):
            result = run_cli(*words[1:])
            assert result.exit_code == 0, (words, result.output)
    predicted = run_cli("predict", "boot.jpg", "--json")
    assert predicted.exit_code == 0 and '"image": "boot.jpg"' in predicted.stdout


def python_block(marker: str) -> str:
    """The one Python block of the pages (the same block may stand on several pages) that holds `marker`."""
    found = {block for block in blocks("python") if marker in block}
    assert len(found) == 1, (marker, found)
    return found.pop()


def test_every_python_block_is_run_here():
    run = {python_block(marker) for marker in ("torch.load", "tritonclient.grpc", "tritonclient.http")}
    assert set(blocks("python")) == run


def test_the_readmes_python_blocks_run_as_written(readme_folder, server):
    tutorial, over_grpc, client = (python_block(marker) for marker in ("torch.load", "tritonclient.grpc",
                                                                        "tritonclient.http"))
    loaded = subprocess.run([sys.executable, "-c", tutorial], cwd=readme_folder, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    asked = subprocess.run([sys.executable, "-c", over_grpc.replace("localhost:8001", server.grpc)],
                           capture_output=True, text=True, timeout=60)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.strip() == "(4, 10) (4, 1)"
    asked = subprocess.run([sys.executable, "-c", client.replace("localhost:8000", f"127.0.0.1:{server.port}")],
                           capture_output=True, text=True, timeout=60)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.count(":") >= 12 and "logit" not in asked.stdout.split("]]")[-1]   # (4, 3) strings, scores


def test_the_readmes_curl_lines_answer_as_the_readme_says(readme_folder, server):
    import json

    [serving] = {block for block in blocks("sh") if "curl" in block}   # the README's, and docs/serving.md's
    answers = []
    for line in lines(serving):
        result = shell(line, readme_folder, server.port)
        assert result.returncode == 0, (line, result.stderr)
        answers.append(json.loads(result.stdout))
    predicted, inferred = answers
    assert predicted[0]["image"] == "boot.jpg" and len(predicted[0]["top"]) == 3
    assert inferred["model_name"] == "fmnist"
    assert {o["name"]: o["shape"] for o in inferred["outputs"]} == {"logits": [1, 10], "ood_score": [1, 1]}
def test_what_the_readmes_examples_write_is_ignored_by_git():
    """Running the README's commands in a checkout leaves `git status` clean: every --out, --plot, --triton and
    --benchmark-json of its examples (a placeholder such as DIR aside) is ignored."""
    import re

    root = Path(__file__).parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    examples = "\n".join(block for text in [*PAGES.values(), (root / "bench/README.md").read_text()]
                         for block in re.findall(r"```(?:sh|console)\n(.*?)```", text, re.S))
    written = {  # what each option writes, as a file git would otherwise show
        "out": "{}/metrics.jsonl", "plot": "{}", "triton": "{}/fmnist/config.pbtxt", "benchmark-json": "{}"}
    paths = [written[option].format(target.rstrip("/"))
             for option, target in re.findall(r"--(out|plot|triton|benchmark-json) ([\w./-]+)", examples)
             if not target.isupper()]
    assert {"runs/lr-bs/metrics.jsonl", "cm.png", "models/fmnist/config.pbtxt", "out.json"} <= set(paths)
    checked = subprocess.run(["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *paths],
                             cwd=root, capture_output=True, text=True)
    assert not [line for line in checked.stdout.splitlines() if line.startswith("::")], checked.stdout


def test_the_readmes_cpu_install_takes_pyprojects_torch_and_its_gpu_options_exist():
    """The CPU wheels' command pins pyproject.toml's torch range (else `pip install -e .` swaps in the CUDA build);
    the GPU paragraph's options are train's real ones."""
    import re

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    wanted = dict(re.findall(r'^ *"((torch|torchvision)[<>=][^"]*)"', (root / "pyproject.toml").read_text(), re.M))
    wanted = {name: spec for spec, name in wanted.items()}
    assert (f'pip install "{wanted["torch"]}" "{wanted["torchvision"]}" '
            "--index-url https://download.pytorch.org/whl/cpu") in readme
    gpu = readme[readme.index("**With a GPU**"):readme.index("## The Network")]
    options = run_cli_wide("train", "--help").stdout
    for option in set(re.findall(r"--[a-z-]+", gpu)) - {"--index-url"}:
        assert option in options, option


