"""Print the results table of a benchmark run as markdown, from pytest-benchmark's JSON files.

    python -m bench.report out.json [more.json ...]

Several files from one machine make one table (bench/gpu.sh writes one file per path, so that a path cut
off by its time limit loses only its own rows); each row's ratio is taken to its baseline in any of them.
An empty or unreadable file (pytest-benchmark writes nothing when no row ran, and truncates the file
before a run that was then killed) is named below the table and otherwise left out.
bench/README.md's tables are this script's output, pasted; nothing in them is typed by hand.
"""

import json
import sys

# The row each ratio is taken to: the CPU row of the same group and batch size with this path.
BASELINES = {"train": "tutorial DataLoader loop", "inference": "torch eager", "levers": "plain loop"}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row (group, name, extra_info) plus `ratio`: its samples/s over its baseline's, the baseline being
    the CPU row of the same group and batch size whose path is BASELINES[group]."""
    base = {(r["group"], r["extra_info"]["batch_size"]): r["extra_info"]["samples_per_second"]
            for r in rows if r["extra_info"]["path"] == BASELINES.get(r["group"]) and r["extra_info"]["device"] == "cpu"}
    for r in rows:
        baseline = base.get((r["group"], r["extra_info"]["batch_size"]))
        r["ratio"] = r["extra_info"]["samples_per_second"] / baseline if baseline else None
    return rows


def report(runs: list[dict]) -> str:
    """The table of all the runs' timed rows; the machine line is the first run's."""
    machine = runs[0]["machine_info"]
    versions = ", ".join(f"{name} {version}" for name, version in machine.get("versions", {}).items())
    lines = [
        f"Measured {runs[0]['datetime'][:10]} on {machine['cpu'].get('brand_raw', machine['processor'])}, "
        f"{machine.get('cores', '?')} cores, GPU: {machine.get('gpu') or 'none'}; {versions}.",
        "",
        "| group | path | device | batch | samples/s | × baseline |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    rows = with_ratios([b for run in runs for b in run["benchmarks"] if "samples_per_second" in b["extra_info"]])
    rows.sort(key=row_order)
    for b in rows:
        info, ratio = b["extra_info"], f"{b['ratio']:.2f}" if b["ratio"] else "-"
        lines.append(f"| {b['group']} | {info['path']} | {info['device']} | {info['batch_size']} | "
                     f"{info['samples_per_second']:,.0f} | {ratio} |")
    return "\n".join(lines)


def row_order(b: dict):
    """Group, batch size, then the order in which the levers are added (levers), else fastest first."""
    info = b["extra_info"]
    return b["group"], info["batch_size"], info.get("order", 0), -info["samples_per_second"]


# The plain summary that ends a run: (group, path, batch size, its name, its baseline's name), each a CPU row
# whose ratio with_ratios takes to its group's baseline at that batch size.
HEADLINES = [("train", "fmnist loop, eager", 100, "fmnist's loop", "the tutorial's"),
             ("inference", "onnxruntime", 1, "onnxruntime", "eager torch")]


def plain_summary(rows: list[dict]) -> str | None:
    """`fmnist's loop: 2.2× the tutorial's at batch 100; onnxruntime: 6.4× eager torch at batch 1`, from rows with
    ratios (with_ratios); the parts whose rows did not run are left out, and None when none did."""
    ratios = {(r["group"], r["extra_info"]["path"], r["extra_info"]["batch_size"]): r["ratio"]
              for r in rows if r["extra_info"]["device"] == "cpu" and r.get("ratio")}
    parts = [f"{name}: {ratios[group, path, batch]:.1f}× {baseline} at batch {batch}"
             for group, path, batch, name, baseline in HEADLINES if (group, path, batch) in ratios]
    return "; ".join(parts) or None


def skipped_summary(reports, groups: dict[str, str]) -> list[str]:
    """One line per reason for pytest's skipped reports (nodeid, longrepr: file, line, 'Skipped: why'), naming the
    benchmark groups it skipped (groups: nodeid -> group) with how many in each; a module skipped whole (an
    importorskip) is named by its file."""
    by_reason: dict[str, dict[str, int]] = {}
    for skipped in reports:
        reason = skipped.longrepr[2] if isinstance(skipped.longrepr, tuple) else str(skipped.longrepr)
        module, _, test = skipped.nodeid.partition("::")
        where = groups.get(skipped.nodeid) or (module if test else f"{module} (all of it)")   # no test: the module
        counts = by_reason.setdefault(reason.removeprefix("Skipped: "), {})
        counts[where] = counts.get(where, 0) + 1
    return [f"skipped, {reason}: " + ", ".join(where if where.endswith("(all of it)") else f"{where} ({n})"
                                               for where, n in counts.items())
            for reason, counts in by_reason.items()]


def main(paths: list[str]) -> None:
    runs, empty = [], []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError):   # ValueError: JSON's decode error
            empty.append(path)
    print(report(runs) if runs else "No benchmark rows: no file holds any.")
    if empty:
        print(f"\nNo rows (none ran, or the run was cut off): {', '.join(empty)}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m bench.report BENCHMARK.json [MORE.json ...]")
    main(sys.argv[1:])
