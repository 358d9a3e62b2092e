"""Print the results table of a benchmark run as markdown, from pytest-benchmark's JSON files.

    python -m bench.report out.json [more.json ...]

Several files from one machine make one table (bench/gpu.sh writes one file per path, so that a path cut
off by its time limit loses only its own rows); each row's ratio is taken to its baseline in any of them.
An empty or unreadable file (pytest-benchmark writes nothing when no row ran, and truncates the file
before a run that was then killed) is named below the table and otherwise left out.
bench/README.md's tables are this script's output, pasted; nothing in them is typed by hand.

The `serve` group (bench/test_serve_speed.py) has tables of its own (serve_report): requests/s, images/s and
latencies by route and concurrency, the ratios to the serving goals, and dynamic batching off and on. So has
the `peers` group (bench/test_peers.py, peers_report): training beside Lightning and Keras.
"""

import json
import sys

# The row each ratio is taken to: the CPU row of the same group and batch size with this path.
BASELINES = {"train": "tutorial DataLoader loop", "inference": "torch eager", "levers": "plain loop"}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row (group, name, extra_info) plus `ratio`: its samples/s over its baseline's, the baseline being
    the CPU row of the same group and batch size whose path is BASELINES[group]."""
    base = {(r["group"], r["extra_info"]["batch_size"]): r["extra_info"]["samples_per_second"]
            for r in rows
            if r["extra_info"]["path"] == BASELINES.get(r["group"]) and r["extra_info"]["device"] == "cpu"}
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
    timed = [b for run in runs for b in run["benchmarks"] if "samples_per_second" in b["extra_info"]]
    rows = with_ratios([b for b in timed if b["group"] not in SEPARATE])
    rows.sort(key=row_order)
    for b in rows:
        info, ratio = b["extra_info"], f"{b['ratio']:.2f}" if b["ratio"] else "-"
        lines.append(f"| {b['group']} | {info['path']} | {info['device']} | {info['batch_size']} | "
                     f"{info['samples_per_second']:,.0f} | {ratio} |")
    if not rows:
        del lines[-3:]   # no table of that kind: the serve group's own follow
    serving = [b for b in timed if b["group"] == "serve"]
    if serving:
        lines += ["", *serve_report(serving)]
    peers = [b for b in timed if b["group"] == "peers"]
    if peers:
        lines += ["", *peers_report(peers)]
    return "\n".join(lines)


# Groups with tables of their own, left out of the table above.
SEPARATE = {"serve", "peers"}
PEERS_BASELINE = "tutorial loop"   # the peers' ratios are to the tutorial's own loop


def peers_report(rows: list[dict]) -> list[str]:
    """The peers group's markdown (bench/test_peers.py): samples/s, the ratio to the tutorial's loop, and the
    test accuracy each peer reached after the same epochs."""
    base = next((b["extra_info"]["samples_per_second"] for b in rows if b["extra_info"]["path"] == PEERS_BASELINE),
                None)
    lines = ["| training with | samples/s | × the tutorial's loop | test accuracy | epochs × rounds |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for b in sorted(rows, key=lambda b: -b["extra_info"]["samples_per_second"]):
        info = b["extra_info"]
        ratio = f"{info['samples_per_second'] / base:.2f}" if base else "-"
        lines.append(f"| {info['path']} | {info['samples_per_second']:,.0f} | {ratio} | {info['test_accuracy']:.2%} "
                     f"| {info['epochs']} × {info['rounds']} |")
    return lines

# The serving goals: (what, row, bound, measure, goal). A row is (path, images per request, concurrency) of the
# server with its default settings, or of a bound in the benchmarks' process (concurrency None).
SERVE_GOALS = [
    ("v2 binary, 1 image, over the no-op route, concurrency 16", ("v2 binary", 1, 16), ("no-op route", 1, 16),
     "requests_per_second", 0.90),
    ("v2 JSON, 1 image, over the no-op route, concurrency 16", ("v2 JSON", 1, 16), ("no-op route", 1, 16),
     "requests_per_second", 0.80),
    ("v2 binary, 1024 images, concurrency 2, over onnxruntime in-process at 1024", ("v2 binary", 1024, 2),
     ("onnxruntime in-process", 1024, None), "samples_per_second", 0.70),
    ("/predict JPEG, concurrency 16, over `fmnist predict`'s preparation and inference in-process",
     ("/predict JPEG", 1, 16), ("predict in-process", 1, None), "samples_per_second", 0.80),
]
SERVE_ORDER = ["onnxruntime in-process", "predict in-process", "no-op route", "v2 binary", "v2 JSON", "/predict JPEG"]
IN_PROCESS = "in-process"


def serve_report(rows: list[dict]) -> list[str]:
    """The serve group's markdown: every row, the goals, and dynamic batching off and on."""
    def figure(value, form="{:,.0f}"):
        return "-" if value is None else form.format(value)

    def order(b):
        info = b["extra_info"]
        path = info["path"]
        return (SERVE_ORDER.index(path) if path in SERVE_ORDER else len(SERVE_ORDER), path, info["batch_size"],
                info.get("server") != "default", info.get("server", ""), info.get("concurrency") or 0)

    lines = ["| route | images/request | concurrency | server | requests/s | images/s | p50 ms | p90 ms | p99 ms | "
             "server CPU ms/request | client CPU ms/request | images/run | refused |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b in sorted(rows, key=order):
        info = b["extra_info"]
        ms = lambda name, info=info: figure(info.get(name), "{:.2f}")   # noqa: E731
        lines.append(
            f"| {info['path']} | {info['batch_size']} | {figure(info.get('concurrency'), '{}')} | "
            f"{info.get('server', '-')} | {figure(info.get('requests_per_second'))} | "
            f"{figure(info['samples_per_second'])} | {ms('p50_ms')} | {ms('p90_ms')} | {ms('p99_ms')} | "
            f"{ms('server_cpu_ms_per_request')} | {ms('client_cpu_ms_per_request')} | "
            f"{figure(info.get('images_per_run'), '{:.1f}')} | {figure(info.get('refused'), '{:.0%}')} |")

    by_key = {}
    for b in rows:
        info = b["extra_info"]
        if info.get("server") in ("default", IN_PROCESS):
            by_key[(info["path"], info["batch_size"], info.get("concurrency"))] = info
    lines += ["", "| goal | row | bound | ratio | goal | met |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for what, row, bound, measure, goal in SERVE_GOALS:
        a, b = by_key.get(row, {}).get(measure), by_key.get(bound, {}).get(measure)
        unit = "requests/s" if measure == "requests_per_second" else "images/s"
        ratio = a / b if a and b else None
        met = "-" if ratio is None else ("yes" if ratio >= goal else "no")
        lines.append(f"| {what} ({unit}) | {figure(a)} | {figure(b)} | {figure(ratio, '{:.2f}')} | {goal:.2f} | "
                     f"{met} |")

    batching = [b["extra_info"] for b in rows if b["extra_info"]["path"] == "v2 binary"
                and b["extra_info"]["batch_size"] == 1 and b["extra_info"].get("concurrency")]
    servers = sorted({info["server"] for info in batching}, key=lambda s: (s != "default", s))
    levels = sorted({info["concurrency"] for info in batching})
    if len(servers) > 1:
        lines += ["", "| v2 binary, 1 image: server | " + " | ".join(
            f"concurrency {c}: {what}" for c in levels for what in ("requests/s", "p50 ms", "p99 ms", "images/run"))
            + " |", "| --- |" + " ---: |" * 4 * len(levels)]
        for server in servers:
            cells = []
            for concurrency in levels:
                info = next((i for i in batching if i["server"] == server and i["concurrency"] == concurrency), {})
                cells += [figure(info.get("requests_per_second")), figure(info.get("p50_ms"), "{:.2f}"),
                          figure(info.get("p99_ms"), "{:.2f}"), figure(info.get("images_per_run"), "{:.1f}")]
            lines.append(f"| {server} | " + " | ".join(cells) + " |")
    return lines


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
