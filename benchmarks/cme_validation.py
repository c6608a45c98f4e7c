"""The CME validation study (issue 10), and what one federation costs in-process vs. on Ray.

    python benchmarks/cme_validation.py --size tiny --out runs/cme-validation-tiny
    python benchmarks/cme_validation.py --size default --out runs/cme-validation      # <= 45 min, 2 cores
    python benchmarks/cme_validation.py --size default --dry-run                        # plan + estimate only
    python benchmarks/cme_validation.py --timing                                       # in-process vs Ray

The study itself is :mod:`fedsim.study.cme_validation` (also ``fedsim study cme-validation``); it
writes ``clients.csv``, ``auroc.csv``, ``verdicts.csv`` and ``study.json`` into ``--out`` and
resumes an interrupted run there. ``--timing`` runs the same tiny federation (3 x small_cnn, 2
rounds) ``--repeat`` times through :class:`~fedsim.server.inprocess.InProcessGrid` and through
Flower's Simulation Engine (Ray), checks that both give identical outputs, and writes
``benchmarks/results/inprocess-vs-ray.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def timing(repeat: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from fedsim.clients.app import app
    from fedsim.clients.tasks import resolve_config
    from fedsim.config import RunConfig
    from fedsim.rundir import RunDir
    from fedsim.server.app import run_server
    from fedsim.server.inprocess import InProcessGrid, ray_client_threads
    from fedsim.simulation import run_simulation
    from fedsim.study.federation import quiet_logs

    base = RunConfig(profile="tiny", models=("small_cnn",) * 3, rounds=2)
    threads = ray_client_threads(resolve_config(base).client_cpus)  # the layout fedsim picks for these clients
    out: dict[str, Any] = {"config": "tiny, 3 x small_cnn, 2 rounds x 2 local epochs", "repeat": repeat, "client_threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        walls: dict[str, list[float]] = {"inprocess": [], "inprocess_1thread": [], "ray": []}
        loads: list[float] = []
        dirs: dict[str, str] = {}
        for i in range(repeat):
            for mode, times in walls.items():
                cfg = resolve_config(dataclasses.replace(base, out=f"{tmp}/{mode}-{i}"))
                t0 = time.perf_counter()
                if mode == "ray":
                    with quiet_logs():
                        run_simulation(cfg)
                else:
                    n = threads if mode == "inprocess" else 1
                    with quiet_logs():
                        run_server(InProcessGrid(app, cfg.clients, num_threads=n), cfg)
                times.append(time.perf_counter() - t0)
                loads.append(round(os.getloadavg()[0], 2))
                dirs[mode] = cfg.out
                print(f"{mode} run {i}: {times[-1]:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        a, b = RunDir(dirs["inprocess"]), RunDir(dirs["ray"])
        pa, pb = a.load_params(), b.load_params()
        out["identical_metrics"] = (a.path / "metrics.jsonl").read_bytes() == (b.path / "metrics.jsonl").read_bytes()
        out["identical_params"] = sorted(pa) == sorted(pb) and all(np.array_equal(pa[k], pb[k]) for k in pa)
    out["wall_s"] = {k: [round(v, 2) for v in vs] for k, vs in walls.items()}
    out["load_average_1min"] = loads  # other processes on the machine; 2-thread torch degrades badly under load
    out["wall_s_median"] = {k: round(float(np.median(vs)), 2) for k, vs in walls.items()}
    out["machine"] = {
        "cpus": os.cpu_count(),
        "arch": platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    out["note"] = (
        "Ray times include ray.init and the actor start-up, paid by every fedsim run; inprocess uses the torch thread "
        "count a Ray actor gets (bit-identical results), inprocess_1thread one thread (faster on a busy machine, "
        "results differ in the last bits)"
    )
    return out


def _seeds(text: str) -> int | tuple[int, ...]:
    """``"10"`` -> 10 (seeds 0..9); ``"30-39"`` -> (30, ..., 39)."""
    first, dash, last = text.partition("-")
    try:
        if not dash:
            return int(first)
        lo, hi = int(first), int(last)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes N or A-B, got {text!r}") from None
    if lo > hi:
        raise argparse.ArgumentTypeError(f"--seeds A-B needs A <= B, got {text!r}")
    return tuple(range(lo, hi + 1))


def main(argv: list[str] | None = None) -> int:
    from fedsim.study import cme_validation as cv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="default", choices=list(cv.SIZES), help="study size (default: %(default)s)")
    p.add_argument("--out", default="runs/cme-validation", help="output folder; an interrupted study there is resumed")
    p.add_argument("--seeds", type=_seeds, help="N (seeds 0..N-1) or A-B (seeds A..B, e.g. fresh held-out seeds); default: the size's")
    p.add_argument("--loo", choices=cv.LOO_MODES, help="leave-one-out runs (default: the size's, 'faulty')")
    p.add_argument(
        "--faults",
        help="only these fault conditions, e.g. few-data:0.1,label-noise:0.5 (default: the size's); a later run with more "
        "conditions in the same --out reuses the finished federations",
    )
    p.add_argument(
        "--held-out-from",
        type=int,
        metavar="K",
        help="also tabulate the verdicts separately for seeds < K (a rule's development) and seeds >= K (its held-out test)",
    )
    p.add_argument("--styles", help=f"only these scenario styles, comma-separated ({', '.join(cv.STYLES)}; default: both)")
    p.add_argument("--workers", type=int, help="parallel processes (default: CPUs / threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    p.add_argument("--no-keep-cme", action="store_true", help="delete each run's CME archive once its statistics are read")
    p.add_argument("--refresh-cme", action="store_true", help="recompute the CME statistics of finished federations (no retraining)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time, run nothing")
    p.add_argument("--timing", action="store_true", help="time one tiny federation in-process vs on Ray instead")
    p.add_argument("--repeat", type=int, default=3, help="--timing repetitions (default: %(default)s)")
    args = p.parse_args(argv)

    from fedsim._logging import enable_console_logging

    enable_console_logging()
    logging.getLogger("fedsim.study").setLevel(logging.INFO)
    if args.timing:
        measured = timing(args.repeat)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "inprocess-vs-ray.json").write_text(json.dumps(measured, indent=2) + "\n")
        print(json.dumps(measured, indent=2))
        return 0
    size = cv.size_for(args.size, args.seeds, args.loo)
    try:
        if args.faults:
            size = dataclasses.replace(size, faults=cv.parse_faults(args.faults))
        if args.styles:
            size = dataclasses.replace(size, styles=tuple(s.strip() for s in args.styles.split(",") if s.strip()))
    except ValueError as e:
        p.error(str(e))
    workers = args.workers or max(1, (os.cpu_count() or 1) // args.threads)
    plan = cv.plan_study(size)
    cpu = cv.estimate_cpu_seconds(plan)
    print(
        f"{size.name}: {len(plan.conditions)} conditions, {len(plan.jobs)} federations; "
        f"estimated {cpu / 60:.0f} CPU-min, ~{cpu / workers / 60:.0f} min with {workers} workers on an idle machine"
    )
    if args.dry_run:
        return 0
    res = cv.run_study(
        args.out,
        size,
        workers=workers,
        threads=args.threads,
        keep_cme=not args.no_keep_cme,
        refresh_cme=args.refresh_cme,
        held_out_from=args.held_out_from,
    )
    print(f"{len(res.rows)} client rows, {len(res.auroc)} AUROC rows in {res.out}; {res.summary['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
