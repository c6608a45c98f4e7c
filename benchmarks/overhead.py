"""Flower + Ray overhead: fedsim's simulation vs. the identical local training as a plain loop.

Both runs use the same config (models, data, epochs, seed) and the same task code (the
``brain_mri`` task's train/evaluate functions); the plain loop does the federation by hand in one
process (equal-weighted averaging of the shared parameters, client models kept in memory), with
no Flower and no Ray, one client after another with torch's default thread count (all cores):
the loop a PyTorch user would write. fedsim runs with the client layout it picks by default
(``--client-cpus`` unset; :func:`fedsim.clients.layout.pick_client_cpus`) unless ``--client-cpus`` is
given. The runs alternate (fedsim, plain, fedsim, plain, ...) ``--repeat`` times; the ratio is
the median of fedsim / plain over the pairs.

Correctness: the final global parameters and every round's per-client metrics must equal those of
the plain loop with the same per-client thread count (the thread count changes floating-point
results): when fedsim's clients use fewer threads than the timed plain loop, one more plain loop
with that many threads is run for the comparison (and timed, for information).

Breakdown (of the last fedsim run; the clients write their timings, :mod:`fedsim.clients.timing`):
start-up (before Ray, ``ray.init``, actor processes, their imports, Flower's set-up up to the first
call, the first call), each round's wall time split into the clients' calls (preparing the model,
training/evaluating, packing the reply) and what happens outside them (Ray and Flower moving
messages and contexts, the server's aggregation, checkpoint and metrics), the same clients'
training time in the plain loop, and what one call moves (the context's private state and the
shared arrays) with its pickling time.

    python benchmarks/overhead.py --profile quick --scenario 1 --repeat 3
    python benchmarks/overhead.py --profile quick --layouts --rounds 3     # 1 x 2-thread vs 2 x 1-thread per model

Writes ``benchmarks/results/overhead-<profile>-s<scenario>.json`` (``--layouts``:
``overhead-layouts-<profile>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim._logging import enable_console_logging
from fedsim.callbacks import ProgressLogger
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.brain_mri import _cohort
from fedsim.clients.timing import TIMINGS_ENV
from fedsim.config import ResolvedConfig, RunConfig
from fedsim.models.sharing import shared_parameter_names
from fedsim.rundir import RunDir
from fedsim.server.inprocess import ray_client_threads, torch_threads
from fedsim.simulation import run_simulation

LAYOUT_MODELS = ("resnet50", "densenet121", "alexnet_skip", "small_cnn")


def plain_loop(cfg: ResolvedConfig, threads: int | None = None) -> tuple[list[dict], dict[str, torch.Tensor], list[dict]]:
    """The same federation as fedsim's equal_avg run, as a sequential PyTorch loop that keeps
    every client's model in memory; ``threads``: torch threads (None: the process's default).

    Returns the per-round client metrics, the final aggregated (global) parameters and the
    seconds each client's training and evaluation took."""
    with torch_threads(threads):
        task = get_task(cfg.task)
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        models = cfg.client_models()
        shared = shared_parameter_names([*models, cfg.server_model], lambda m: task.build_model(m, cfg))
        torch.manual_seed(cfg.seed)
        server_state = task.build_model(cfg.server_model, cfg).state_dict()
        global_arrays = {k: server_state[k].clone() for k in shared}
        nets: dict[int, torch.nn.Module] = {}
        for pid in range(cfg.clients):  # same private initialisation as fedsim's clients
            torch.manual_seed(cfg.seed * 1000 + pid)
            nets[pid] = task.build_model(models[pid], cfg)
        rows, times = [], []
        assert cfg.rounds is not None
        for rnd in range(1, cfg.rounds + 1):
            replies, train_metrics = [], {}
            for pid, model in nets.items():
                t = time.perf_counter()
                model.load_state_dict(global_arrays, strict=False)
                train_metrics[pid] = task.train(model, cfg, pid, rnd, dev, callbacks=[ProgressLogger()]).metrics
                replies.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in global_arrays})
                times.append({"phase": "train", "round": rnd, "client": pid, "model": models[pid], "work_s": time.perf_counter() - t})
            global_arrays = {
                k: torch.from_numpy(np.mean([r[k].numpy() for r in replies], axis=0).astype(replies[0][k].numpy().dtype)) for k in shared
            }
            clients = []
            for pid, model in nets.items():
                # evaluate the received global arrays on top of the private state, as fedsim's clients
                # do, without changing the model that trains next round (it receives them anyway)
                t = time.perf_counter()
                model.load_state_dict(global_arrays, strict=False)
                ev = task.evaluate_local(model, cfg, pid, dev)
                times.append({"phase": "evaluate", "round": rnd, "client": pid, "model": models[pid], "work_s": time.perf_counter() - t})
                clients.append({"client": pid, "train_accuracy": train_metrics[pid]["accuracy"], "test_accuracy": ev.metrics["accuracy"]})
            rows.append({"round": rnd, "clients": clients})
    return rows, global_arrays, times


@contextmanager
def timed_ray_init(marks: dict[str, float]) -> Iterator[None]:
    """Record when ``ray.init`` starts and ends (Unix seconds) in ``marks``."""
    import ray

    original = ray.init

    def init(*args: Any, **kwargs: Any) -> Any:
        marks["ray_init_start"] = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            marks["ray_init_end"] = time.time()

    ray.init = init
    try:
        yield
    finally:
        ray.init = original


def run_fedsim(cfg: RunConfig, tmp: Path) -> dict[str, Any]:
    # an unresolved config: run_simulation picks the layout itself (and records that it did)
    """One timed ``run_simulation`` with client timings; returns its outputs and marks."""
    timings = tmp / "client-timings.jsonl"
    run_cfg = dataclasses.replace(cfg, out=str(tmp / "run"))
    marks: dict[str, float] = {}
    os.environ[TIMINGS_ENV] = str(timings)
    try:
        with timed_ray_init(marks):
            marks["start"] = time.time()
            t0 = time.perf_counter()
            run_simulation(run_cfg)
            seconds = time.perf_counter() - t0
            marks["end"] = time.time()
    finally:
        os.environ.pop(TIMINGS_ENV, None)
    rd = RunDir(run_cfg.out)
    return {
        "seconds": seconds,
        "marks": marks,
        "calls": [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else [],
        "metrics": rd.read_metrics(),
        "params": rd.load_params(),
        "config": json.loads((rd.path / "config.json").read_text()),
    }


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals."""
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _r(x: float) -> float:
    return round(x, 2)


def breakdown(run: dict[str, Any], plain_times: list[dict], same_thread_times: list[dict], clients: int) -> dict[str, Any]:
    """Start-up and per-round costs of one fedsim run (see the module doc)."""
    m, calls = run["marks"], sorted(run["calls"], key=lambda c: c["start"])
    if not calls:
        return {}
    first = calls[0]
    by_pid: dict[int, dict] = {}
    for c in calls:
        by_pid.setdefault(c["pid"], c)
    actors = sorted(by_pid.values(), key=lambda c: c["process_started"] or 0)
    started = actors[0]["process_started"] or actors[0]["imported"]
    start_up = {
        "before_ray_s": m["ray_init_start"] - m["start"],  # config, data check (the server generates the cohort), imports
        "ray_init_s": m["ray_init_end"] - m["ray_init_start"],
        "actor_process_started_after_ray_init_began_s": started - m["ray_init_start"],
        "actor_imports_s": actors[0]["imported"] - started,  # Ray worker start-up, then torch, Flower, fedsim
        "first_call_began_s": first["start"] - m["start"],  # since run_simulation was called
        "first_call_s": first["total_s"],  # incl. the client's cohort generation (once per actor process)
        "first_call_parts": {k: first[k] for k in ("prepare_s", "work_s", "reply_s")},
    }
    start_up = {k: (_r(v) if isinstance(v, float) else v) for k, v in start_up.items()}
    last_end = max(c["start"] + c["total_s"] for c in calls)
    rounds = []
    for row in run["metrics"]:
        rc = [c for c in calls if c["round"] == row["round"]]
        busy = _union([(c["start"], c["start"] + c["total_s"]) for c in rc])
        wall = row.get("wall_s") or 0.0
        rounds.append({
            "round": row["round"], "wall_s": _r(wall), "calls_busy_s": _r(busy), "outside_calls_s": _r(wall - busy),
            "prepare_s": _r(sum(c.get("prepare_s", 0) for c in rc)), "work_s": _r(sum(c.get("work_s", 0) for c in rc)),
            "reply_s": _r(sum(c.get("reply_s", 0) for c in rc)),
        })  # fmt: skip
    later = [r for r in rounds if r["round"] > 1] or rounds
    # the same client's training in the actor and in the plain loop (rounds after the first: no start-up)
    actor_vs_plain = {}

    def med(rows: list[dict], pid: int) -> float | None:
        v = [t["work_s"] for t in rows if t["phase"] == "train" and t["client"] == pid and t["round"] > 1]
        return statistics.median(v) if v else None

    for pid in range(clients):
        a, p, q = med(calls, pid), med(plain_times, pid), med(same_thread_times, pid)
        if a is not None and p is not None and q is not None:
            model = next(c["model"] for c in calls if c["client"] == pid)
            actor_vs_plain[f"{pid} {model}"] = {
                "actor_train_s_median": _r(a), "plain_train_s_median": _r(p), "plain_same_threads_train_s_median": _r(q),
                "actor_over_plain_same_threads": round(a / q, 3),
            }  # fmt: skip
    return {
        "total_s": _r(run["seconds"]),
        "start_up": start_up,
        "rounds": rounds,
        "per_round_median": {k: _r(statistics.median(r[k] for r in later)) for k in later[0] if k != "round"},
        "after_last_call_s": _r(m["end"] - last_end),
        "actors": [
            {"pid": a["pid"], "nice": a["nice"], "torch_threads": a["torch_threads"], "omp_num_threads": a["omp_num_threads"]}
            for a in actors
        ],
        "train_in_actor_vs_plain": actor_vs_plain,
    }


def transfer_sizes(cfg: ResolvedConfig) -> dict[str, Any]:
    """Per client: MB of the private state (travels in ``Context.state`` to the actor and back with
    every call) and of the shared arrays (in each train message and reply), and the seconds to
    pickle and unpickle the private state as an ``ArrayRecord`` (what Ray does each way)."""
    from flwr.app import ArrayRecord

    task = get_task(cfg.task)
    models = cfg.client_models()
    shared = set(shared_parameter_names([*models, cfg.server_model], lambda m: task.build_model(m, cfg)))
    out = {}
    for pid, name in enumerate(models):
        state = task.build_model(name, cfg).state_dict()
        private = {k: v for k, v in state.items() if k not in shared}
        mb = sum(v.numel() * v.element_size() for v in private.values()) / 1e6
        t = time.perf_counter()
        blob = pickle.dumps(ArrayRecord(private), protocol=5)
        pickle.loads(blob)
        pickle_s = time.perf_counter() - t
        shared_mb = sum(v.numel() * v.element_size() for k, v in state.items() if k in shared) / 1e6
        out[f"{pid} {name}"] = {"private_mb": round(mb, 1), "shared_mb": round(shared_mb, 2), "pickle_roundtrip_s": round(pickle_s, 3)}
    return out


def _compare(fed: dict[str, Any], plain_rows: list[dict], plain_params: dict[str, torch.Tensor]) -> dict[str, Any]:
    max_diff = max(float(np.abs(fed["params"][k] - plain_params[k].numpy()).max()) for k in fed["params"])
    fed_m = [[(c["train_accuracy"], c["test_accuracy"]) for c in r["clients"]] for r in fed["metrics"]]
    plain_m = [[(c["train_accuracy"], c["test_accuracy"]) for c in r["clients"]] for r in plain_rows]
    return {
        "all_round_metrics_equal": fed_m == plain_m,
        "max_abs_diff_final_params": max_diff,
        "final_fedsim": fed_m[-1],
        "final_plain": plain_m[-1],
    }


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    given = RunConfig(scenario=args.scenario, profile=args.profile, rounds=args.rounds, strategy="equal_avg", client_cpus=args.client_cpus)
    cfg = resolve_config(given)
    threads = ray_client_threads(cfg.client_cpus)
    fed_times, plain_times, ratios = [], [], []
    fed: dict[str, Any] = {}
    plain_calls: list[dict] = []
    plain_rows: list[dict] = []
    plain_params: dict[str, torch.Tensor] = {}
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            fed = run_fedsim(given, Path(tmp))
        fed_times.append(fed["seconds"])
        _cohort.cache_clear()  # the plain loop generates its data too, like fedsim's client process
        t0 = time.perf_counter()
        plain_rows, plain_params, plain_calls = plain_loop(cfg)
        plain_times.append(time.perf_counter() - t0)
        ratios.append(fed_times[-1] / plain_times[-1])
        print(
            f"repeat {i + 1}/{args.repeat}: fedsim {fed_times[-1]:.1f}s, plain {plain_times[-1]:.1f}s, ratio {ratios[-1]:.3f}",
            file=sys.stderr,
        )
    same_threads: dict[str, Any] = {"threads": threads}
    same_calls = plain_calls
    if threads != torch.get_num_threads():  # bit-identity needs the clients' thread count
        _cohort.cache_clear()
        t0 = time.perf_counter()
        plain_rows, plain_params, same_calls = plain_loop(cfg, threads)
        same_threads["seconds"] = _r(time.perf_counter() - t0)
    same_threads.update(_compare(fed, plain_rows, plain_params))
    return {
        "profile": cfg.profile,
        "scenario": cfg.scenario,
        "rounds": cfg.rounds,
        "local_epochs": cfg.local_epochs,
        "clients": list(cfg.client_models()),
        "layout": {"client_cpus": cfg.client_cpus, "picked": args.client_cpus is None, "ray": fed["config"].get("ray")},
        "fedsim_seconds_median": _r(statistics.median(fed_times)),
        "plain_seconds_median": _r(statistics.median(plain_times)),
        "plain_threads": torch.get_num_threads(),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "all_fedsim_seconds": [_r(t) for t in fed_times],
        "all_plain_seconds": [_r(t) for t in plain_times],
        "same_threads_plain": same_threads,
        "breakdown": breakdown(fed, plain_calls, same_calls, cfg.clients),
        "transfer_per_call": transfer_sizes(cfg),
    }


def layouts(args: argparse.Namespace) -> dict[str, Any]:
    """Per model (3 clients of it): fedsim with 1 client of ``cpus`` threads at a time vs ``cpus``
    clients of 1 thread, alternating, ``--repeat`` times; round wall times after the first round."""
    cpus = os.cpu_count() or 1
    out: dict[str, Any] = {}
    for model in args.models.split(","):
        rows: dict[str, list[float]] = {"sequential": [], "parallel": []}
        totals: dict[str, list[float]] = {"sequential": [], "parallel": []}
        # train calls (rounds after the first): all with N threads; 1 thread next to another client; 1 thread alone
        work: dict[str, list[float]] = {"threads": [], "beside": [], "alone": []}
        for i in range(args.repeat):
            for name, client_cpus in (("sequential", float(cpus)), ("parallel", 1.0)):
                cfg = resolve_config(
                    RunConfig(scenario=args.scenario, profile=args.profile, rounds=args.rounds, models=(model,), client_cpus=client_cpus)
                )
                with tempfile.TemporaryDirectory() as tmp:
                    run = run_fedsim(cfg, Path(tmp))
                rounds = [r["wall_s"] for r in run["metrics"] if r["round"] > 1]
                rows[name].extend(rounds)
                for c in run["calls"]:
                    if c["phase"] == "train" and c["round"] > 1:
                        # 3 clients on 2 actors: the first two train side by side, the third alone after them
                        kind = "threads" if name == "sequential" else "alone" if c["client"] == 2 else "beside"
                        work[kind].append(c["work_s"])
                totals[name].append(run["seconds"])
                print(f"{model} {name} {i + 1}/{args.repeat}: {run['seconds']:.1f}s, rounds after the first {rounds}", file=sys.stderr)
        seq, par = statistics.median(rows["sequential"]), statistics.median(rows["parallel"])
        med = {k: statistics.median(v) for k, v in work.items() if v}
        profile = (
            {
                "seconds": _r(med["alone"]),
                "gain": round(med["alone"] / med["threads"], 3),
                "contention": round(med["beside"] / med["alone"], 3),
            }
            if len(med) == 3
            else None
        )
        out[model] = {
            "thread_profile": profile,
            "train_call_s_median": {k: _r(v) for k, v in med.items()},
            "sequential_round_s_median": _r(seq), "parallel_round_s_median": _r(par), "parallel_over_sequential": round(par / seq, 3),
            "sequential_total_s": [_r(t) for t in totals["sequential"]], "parallel_total_s": [_r(t) for t in totals["parallel"]],
            "sequential_rounds_s": [_r(t) for t in rows["sequential"]], "parallel_rounds_s": [_r(t) for t in rows["parallel"]],
        }  # fmt: skip
    return {"profile": args.profile, "rounds": args.rounds, "clients": 3, "cpus": cpus, "models": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="quick")
    p.add_argument("--scenario", type=int, default=1)
    p.add_argument("--rounds", type=int)
    p.add_argument("--client-cpus", type=float, help="fedsim's --client-cpus (default: the layout fedsim picks)")
    p.add_argument("--repeat", type=int, default=1, help="alternate the runs N times; report medians")
    p.add_argument("--layouts", action="store_true", help="measure 1 x N-thread vs N x 1-thread clients per model instead")
    p.add_argument("--models", default=",".join(LAYOUT_MODELS), help="models for --layouts (default: %(default)s)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    enable_console_logging()
    load = os.getloadavg()
    t = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = layouts(args) if args.layouts else overhead(args)
    result["measured"] = {
        "at": t,
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {'cuda' if torch.cuda.is_available() else 'cpu'}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"overhead-layouts-{args.profile}.json" if args.layouts else f"overhead-{args.profile}-s{args.scenario}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
