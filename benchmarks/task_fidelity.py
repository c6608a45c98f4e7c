"""The ``paper`` and ``authors`` recipes of the two 3D tasks side by side on the synthetic cohorts.

Each run is a whole federation in this process (:func:`fedsim.study.federation.run_federation`:
``fedsim.server.app.run_server`` through the in-process grid, no Ray; 3 clients, iid, seed 0), on
a reduced quick profile that fits a shared 2-core CPU (``--size small``: h3denet 60 cases, 3
rounds x 1 local epoch; aicnet3d 120 volumes, 3 rounds x 1 local epoch; ``--size medium``: 120
cases, 8 rounds; 240 volumes, 6 rounds) or the full quick profile (``--size quick``). It records the global model's metrics after the last round and the wall time.

    python benchmarks/task_fidelity.py --size small --out-root runs/fidelity

Writes ``benchmarks/results/task-fidelity-<size>.json`` and prints a Markdown table. A run folder
that already holds a finished run is reused, not retrained. Synthetic data only: the native-
resolution handling of real CT (both recipes) and the authors' OCT tree need real data.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "small": {
        "h3denet": {"profile": "quick", "num_samples": 60, "rounds": 3, "local_epochs": 1},
        "aicnet3d": {"profile": "quick", "num_samples": 120, "rounds": 3, "local_epochs": 1},
    },
    "medium": {
        "h3denet": {"profile": "quick", "num_samples": 120, "rounds": 8, "local_epochs": 1},
        "aicnet3d": {"profile": "quick", "num_samples": 240, "rounds": 6, "local_epochs": 1},
    },
    "quick": {"h3denet": {"profile": "quick"}, "aicnet3d": {"profile": "quick"}},
}
RECIPES = ("paper", "authors")
KEYS = {
    "h3denet": ("loss", "mre", "sd", "mre-case", "sd-case", "sdr-2mm", "sdr-4mm", "mre-case-missing", "landmarks"),
    "aicnet3d": ("loss", "auc", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "f1"),
}


def run(task: str, recipe: str, size: str, out_root: Path, threads: int, rounds: int | None = None) -> dict[str, Any]:
    from fedsim.config import RunConfig
    from fedsim.study.federation import FederationJob, run_federation

    fields = {**SIZES[size][task], **({"rounds": rounds} if rounds else {})}
    cfg = RunConfig(task=task, seed=0, task_options=(("recipe", recipe),), **fields)
    record = run_federation(
        FederationJob(f"{task}-{recipe}", cfg, cme=False, probe=False), out_root / f"{task}-{recipe}", num_threads=threads
    )
    last = record["metrics"][-1]
    glob = last.get("global") or {}
    return {
        "task": task,
        "recipe": recipe,
        "config": {
            k: record["config"][k] for k in ("profile", "num_samples", "rounds", "local_epochs", "batch_size", "clients", "image_size")
        },
        "rounds_done": len(record["metrics"]),
        "global": {k: glob.get(k) for k in KEYS[task]},
        "global_per_round": [{k: (m.get("global") or {}).get(k) for k in KEYS[task][:3]} for m in record["metrics"]],
        "wall_s": round(record["wall_s"], 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    for task in ("h3denet", "aicnet3d"):
        sel = [r for r in rows if r["task"] == task]
        if not sel:
            continue
        keys = KEYS[task]
        out.append(f"| {task} recipe | " + " | ".join(keys) + " | wall (s) |")
        out.append("|---" * (len(keys) + 2) + "|")
        for r in sel:
            vals = ["" if r["global"][k] is None else f"{r['global'][k]:.3f}" for k in keys]
            out.append(f"| {r['recipe']} | " + " | ".join(vals) + f" | {r['wall_s']:.0f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--tasks", default="h3denet,aicnet3d", help="comma-separated: h3denet, aicnet3d")
    ap.add_argument("--out-root", type=Path, default=Path("runs/fidelity"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process clients")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: paper, authors")
    ap.add_argument("--rounds", type=int, default=None, help="override the size's number of rounds")
    ap.add_argument("--results", type=Path, default=None, help="default: benchmarks/results/task-fidelity-<size>.json")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in KEYS]
    if bad:
        ap.error(f"unknown task(s) {', '.join(bad)}; valid choices: {', '.join(KEYS)}")
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if any(r not in RECIPES for r in recipes):
        ap.error(f"unknown recipe(s) in {args.recipes!r}; valid choices: {', '.join(RECIPES)}")
    root = args.out_root / (args.size if args.rounds is None else f"{args.size}-r{args.rounds}")
    rows = []
    for task in tasks:
        for recipe in recipes:
            rows.append(run(task, recipe, args.size, root, args.threads, args.rounds))
            print(f"{task} {recipe}: {rows[-1]['global']} ({rows[-1]['wall_s']} s)", file=sys.stderr, flush=True)
    results = args.results or Path(__file__).parent / "results" / f"task-fidelity-{args.size}.json"
    machine = {"python": platform.python_version(), "machine": platform.machine(), "cpus": __import__("os").cpu_count()}
    payload = {"size": args.size, "sizes": SIZES[args.size], "rounds_override": args.rounds, "machine": machine, "runs": rows}
    results.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
