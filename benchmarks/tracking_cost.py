"""Cost of experiment tracking: what each tracker adds to a run, measured by replaying a finished
run's ``metrics.jsonl`` through it (the same calls, in the same order, as during the run: open,
one ``log`` per round, close), into a temporary copy of the run directory.

Reported per tracker: seconds to open the first time in the process (``open_first_s``: its
library's import and creating the store, what a run pays) and at best (``open_s``), per round and
to close (fastest of ``--repeat``), and the bytes it stored. Run it on a run made with ``--cme`` to include
the CME norms read from the archive.

    python benchmarks/tracking_cost.py RUN_DIR --repeat 3

Writes ``benchmarks/results/tracking-cost.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsim.rundir import RunDir
from fedsim.tracking import TRACKERS, open_tracking

STORES = {"tensorboard": "tb", "mlflow": "mlflow.db"}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def replay(run_dir: Path, tracker: str) -> dict[str, Any]:
    """Open ``tracker`` on a copy of ``run_dir``, log every round, close; time each step."""
    rows = RunDir(run_dir).read_metrics()
    config = RunDir(run_dir).read_config()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run_dir.name
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("tb", "mlflow.db", "mlflow-artifacts"))
        t0 = time.perf_counter()
        ctx = open_tracking(tracker, copy, config, cme=bool(config.get("cme")))
        listener = ctx.__enter__()
        opened = time.perf_counter() - t0
        assert listener is not None
        per_round = []
        for row in rows:
            t = time.perf_counter()
            listener(row)
            per_round.append(time.perf_counter() - t)
        t = time.perf_counter()
        ctx.__exit__(None, None, None)
        closed = time.perf_counter() - t
        stored = _size(copy / STORES[tracker])
    return {"open_s": opened, "round_s": min(per_round), "close_s": closed, "bytes": stored, "rounds": len(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished 'fedsim run' folder")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--trackers", default="tensorboard,mlflow")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tracking-cost.json"))
    args = ap.parse_args()
    out: dict[str, Any] = {"run_dir": str(args.run_dir), "machine": platform.platform(), "python": sys.version.split()[0], "trackers": {}}
    for name in args.trackers.split(","):
        TRACKERS.get(name).check()
        runs = [replay(args.run_dir, name) for _ in range(args.repeat)]
        best = {k: min(r[k] for r in runs) for k in ("open_s", "round_s", "close_s")}
        out["trackers"][name] = best | {"open_first_s": runs[0]["open_s"], "bytes": runs[0]["bytes"], "rounds": runs[0]["rounds"]}
        print(f"{name}: open {runs[0]['open_s']:.2f} s (first), {best['open_s']:.2f} s (best), {best['round_s'] * 1000:.1f} ms per round, "
              f"close {best['close_s']:.2f} s, "
              f"{runs[0]['bytes'] / 1000:.0f} kB for {runs[0]['rounds']} rounds")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
