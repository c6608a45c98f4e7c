"""Large federations: wall time and peak memory of ``fedsim run`` with 10 / 100 / 1,000 ``small_cnn``
clients, every client per round and 10 % sampled (``--fraction-train 0.1``).

Each row is one ``fedsim run`` in a fresh process (``--profile tiny``: 32 px images, 2 local
epochs; ``--num-samples 24 x clients``, so every client holds about 20 images, 16 to train and 4 to
test). While it runs, the proportional set size (PSS, from ``/proc/PID/smaps_rollup``: shared pages
split between the processes that map them) of the run's whole process tree (the CLI, Ray's GCS,
raylet and workers, the client actors) is summed twice a second; the table gives its peak ("extra
RAM": what the run adds to the machine) and the wall time from start to exit. Prints a Markdown
table and writes ``benchmarks/results/scale.json``.

    python benchmarks/scale.py                                  # the whole table (long: see docs/scale.md)
    python benchmarks/scale.py --clients 1000 --modes sampled   # the issue's target row
    python benchmarks/scale.py --clients 10 100 --rounds 2      # a quick look
    python benchmarks/scale.py --all-rounds-1000 0              # the table without 1,000 x all
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

#: Share of the clients sampled per round in the ``sampled`` mode.
SAMPLED_FRACTION = 0.1
#: Synthetic images per client (before the global and local test splits).
IMAGES_PER_CLIENT = 24


def _children(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def tree_pss_bytes(root: int) -> int:
    """Summed PSS of process ``root`` and its descendants (bytes)."""
    total = 0
    for pid in _children(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples :func:`tree_pss_bytes` of a process every ``interval`` s in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_bytes(self.pid))
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_row(clients: int, mode: str, rounds: int, out: Path, seed: int) -> dict[str, object]:
    """One ``fedsim run``; returns its row (wall time, peak PSS, clients per round, rounds)."""
    args = [
        sys.executable, "-m", "fedsim.cli", "run", "--profile", "tiny", "--clients", str(clients), "--models", "small_cnn",
        "--rounds", str(rounds), "--num-samples", str(IMAGES_PER_CLIENT * clients), "--seed", str(seed), "--out", str(out),
    ]  # fmt: skip
    if mode == "sampled":
        args += ["--fraction-train", str(SAMPLED_FRACTION)]
    start = time.monotonic()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        mem = PeakMemory(proc.pid)
        rc = proc.wait()
    wall = time.monotonic() - start
    peak = mem.stop()
    if rc != 0:
        raise RuntimeError(f"fedsim run failed ({rc}); see {out.with_suffix('.log')}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_round = sorted({len(r["clients"]) for r in lines})
    return {
        "clients": clients,
        "mode": mode,
        "per_round": per_round[0] if len(per_round) == 1 else per_round,
        "rounds": len(lines),
        "wall_s": round(wall, 1),
        "peak_pss_gb": round(peak / 1e9, 2),
        "metrics_bytes": (out / "metrics.jsonl").stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--modes", nargs="+", choices=["all", "sampled"], default=["sampled", "all"])
    p.add_argument("--rounds", type=int, default=5, help="rounds per run (default: %(default)s)")
    p.add_argument(
        "--all-rounds-1000",
        type=int,
        default=1,
        help="rounds of a run of 1,000 or more clients with every client, 0 = skip it (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/scale.json")
    args = p.parse_args(argv)
    rows = []
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedsim-scale-") as tmp:
        for n in args.clients:
            for mode in args.modes:
                rounds = args.all_rounds_1000 if (n >= 1000 and mode == "all") else args.rounds
                if rounds == 0:
                    continue
                row = run_row(n, mode, rounds, Path(tmp) / f"{n}-{mode}", args.seed)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| clients | per round | rounds | wall time | peak RAM (PSS) | metrics.jsonl |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['clients']} | {r['per_round']} | {r['rounds']} | {r['wall_s']:.0f} s | {r['peak_pss_gb']:.2f} GB"
            f" | {int(r['metrics_bytes']) / 1e3:.0f} kB |"  # type: ignore[call-overload]
        )
    info = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_at_start": load_at_start,
        "load_at_end": os.getloadavg(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
