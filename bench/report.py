"""Print the results table of a benchmark run as markdown, from pytest-benchmark's JSON file.

    python -m bench.report out.json

bench/README.md's tables are this script's output, pasted; nothing in them is typed by hand.
"""

import json
import sys


def report(run: dict) -> str:
    machine = run["machine_info"]
    versions = ", ".join(f"{name} {version}" for name, version in machine.get("versions", {}).items())
    lines = [
        f"Measured {run['datetime'][:10]} on {machine['cpu'].get('brand_raw', machine['processor'])}, "
        f"{machine.get('cores', '?')} cores, GPU: {machine.get('gpu') or 'none'}; {versions}.",
        "",
        "| group | path | device | batch | samples/s | × baseline |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    rows = [b for b in run["benchmarks"] if "samples_per_second" in b["extra_info"]]
    rows.sort(key=row_order)
    for b in rows:
        info = b["extra_info"]
        ratio = info.get("ratio_to_baseline")
        lines.append(f"| {b['group']} | {info['path']} | {info['device']} | {info['batch_size']} | "
                     f"{info['samples_per_second']:,.0f} | {f'{ratio:.2f}' if ratio else '-'} |")
    return "\n".join(lines)


def row_order(b: dict):
    """Group, batch size, then the order in which the levers are added (levers), else fastest first."""
    info = b["extra_info"]
    return b["group"], info["batch_size"], info.get("order", 0), -info["samples_per_second"]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.report BENCHMARK.json")
    with open(sys.argv[1]) as f:
        print(report(json.load(f)))
