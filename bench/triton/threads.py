"""Where each server's CPU goes under one perf_analyzer load: every thread's share of a core and its CPU time per
request, the client's, the machine's idle time, and the connections each server process holds.

    python -m bench.triton.threads export/fmnist.onnx --protocol grpc [--load 1x16] [--rounds 2] [--workers 2]

fmnist serve and tritonserver (as bench.triton.compare starts them) take turns, round after round. In each turn
perf_analyzer runs the load; once it has settled, every thread of the server's processes is read from /proc
(utime + stime) at the start and end of a window, with perf_analyzer's own threads and /proc/stat's idle time.
A server that leaves the machine idle while one thread is near a whole core is held by that thread (for a Python
server, by its interpreter's lock); one that leaves no idle time is held by the CPU each request costs.
"""

import argparse
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench.common import cpu
from bench.triton import compare, peer

TICK = os.sysconf("SC_CLK_TCK")
SETTLE, WINDOW = 2.0, 2.0   # seconds of load before the window (perf_analyzer's warm-up), and the window


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        for task in Path(f"/proc/{found[-1]}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:   # the thread or process ended meanwhile
                pass
    return found


def thread_seconds(pids: list[int]) -> dict[tuple[int, int, str], float]:
    """(pid, tid, thread name) -> CPU seconds so far, user and system, for every thread of these processes."""
    seconds = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stat, name = (task / "stat").read_text(), (task / "comm").read_text().strip()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()   # after the name, which may hold spaces
            seconds[pid, int(task.name), name] = (int(fields[11]) + int(fields[12])) / TICK
    return seconds


def machine_idle() -> tuple[int, int]:
    """(idle, all) jiffies of the whole machine so far, /proc/stat's first line (idle and iowait as idle)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[3] + values[4], sum(values)


def connections(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections to `port` held by each of these processes."""
    held = {}
    for pid in pids:
        try:
            held[pid] = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:
            continue
    local = f":{port:04X}"
    counts: dict[int, int] = defaultdict(int)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(local) and fields[3] == "01":   # 01: ESTABLISHED
                for pid, sockets in held.items():
                    if f"socket:[{fields[9]}]" in sockets:
                        counts[pid] += 1
    return dict(counts)


def sample(tools: peer.Tools, url: str, server_pid: int, batch: int, concurrency: int, protocol: str,
           requests: int) -> dict:
    """One turn: perf_analyzer's row for the load, and the threads' CPU over a window inside it."""
    row: dict = {}
    failed: list[Exception] = []

    def load() -> None:
        try:
            row.update(peer.perf_analyzer(tools, url, batch=batch, concurrency=concurrency, requests=requests,
                                          protocol=protocol))
        except Exception as e:   # told after the join, in this thread
            failed.append(e)

    client = threading.Thread(target=load)
    client.start()
    time.sleep(SETTLE)
    servers = process_tree(server_pid)
    clients = [pid for pid in process_tree(os.getpid()) if pid not in servers and pid != os.getpid()
               and Path(f"/proc/{pid}/comm").read_text().strip() == "perf_analyzer"]
    held = connections(servers, int(url.rsplit(":", 1)[1]))
    before, idle_before, started = thread_seconds(servers + clients), machine_idle(), time.perf_counter()
    time.sleep(WINDOW)
    after, idle_after, window = thread_seconds(servers + clients), machine_idle(), time.perf_counter() - started
    covered = client.is_alive()
    client.join()
    if failed:
        raise failed[0]
    if not covered:
        raise RuntimeError(f"perf_analyzer's load ended inside the {WINDOW:g} s window: ask for more --requests")
    rate = row["Inferences/Second"] / batch   # requests a second
    used = {key: after[key] - before.get(key, 0.0) for key in after}
    threads = [{"process": "client" if key[0] in clients else key[0], "thread": key[2]
                + (" (main)" if key[0] == key[1] else ""), "tid": key[1], "core": seconds / window,
                "us_per_request": seconds / (window * rate) * 1e6}
               for key, seconds in sorted(used.items(), key=lambda item: -item[1]) if seconds > 0]
    idle = (idle_after[0] - idle_before[0]) / max(1, idle_after[1] - idle_before[1])
    return {"infer_per_s": row["Inferences/Second"], "idle": idle * (os.cpu_count() or 1), "threads": threads,
            "connections": held, "window": window, "perf_analyzer_ran": bool(clients)}


def report(name: str, turn: dict, top: int = 8) -> str:
    server = [t for t in turn["threads"] if t["process"] != "client"]
    client = [t for t in turn["threads"] if t["process"] == "client"]
    total = lambda threads, key: sum(t[key] for t in threads)   # noqa: E731
    lines = [f"{name}: {turn['infer_per_s']:,.0f} infer/s; the machine idle {turn['idle']:.0%} of a core; server "
             f"{total(server, 'core'):.0%} of a core, {total(server, 'us_per_request'):,.0f} µs a request; client "
             f"{total(client, 'core'):.0%}, {total(client, 'us_per_request'):,.0f} µs; connections by process "
             f"{turn['connections']}"]
    for t in server[:top]:
        lines.append(f"    {t['process']} {t['tid']} {t['thread']}: {t['core']:.0%} of a core, "
                     f"{t['us_per_request']:,.0f} µs a request")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="the exported model (fmnist export --onnx)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="grpc")
    parser.add_argument("--load", default="1x16", help="IMAGESxCONCURRENCY (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=4000, help="requests in each measurement window")
    parser.add_argument("--workers", type=int, default=1, help="fmnist serve --workers")
    args = parser.parse_args()
    batch, concurrency = (int(n) for n in args.load.split("x"))
    tools = peer.tools()
    if isinstance(tools, str):
        raise SystemExit(tools)
    print(f"{cpu()}, {os.cpu_count()} cores; {args.protocol}; {batch} images a request at concurrency "
          f"{concurrency}; fmnist serve --workers {args.workers}; TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT="
          f"{os.environ.get('TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT', '(unset)')}", flush=True)
    with compare.both_servers(tools, args.onnx, args.workers) as (fmnist, triton):
        for round_ in range(args.rounds):
            for name, server in (("fmnist", fmnist), ("triton", triton)):
                turn = sample(tools, compare.address(server, args.protocol), server.process.pid, batch, concurrency,
                              args.protocol, args.requests)
                print(f"\nround {round_ + 1}, " + report(name, turn), flush=True)


if __name__ == "__main__":
    main()
