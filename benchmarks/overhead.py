"""Flower + Ray overhead: fedsim's simulation vs. the identical local training as a plain loop.

Both runs use the same config (models, data, epochs, seed) and the same task code (the
``brain_mri`` task's train/evaluate functions); the plain loop does the federation by hand in one
process (equal-weighted averaging of the shared parameters, client models kept in memory), with
no Flower and no Ray. Prints both wall times, their ratio, whether the final per-client metrics
agree and the largest difference between the final global parameters (0.0: identical); writes ``benchmarks/results/overhead-<profile>-s<scenario>.json``.

    python benchmarks/overhead.py --profile quick --scenario 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedsim._logging import enable_console_logging
from fedsim.callbacks import ProgressLogger
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.brain_mri import _cohort
from fedsim.config import ResolvedConfig, RunConfig
from fedsim.models.sharing import shared_parameter_names
from fedsim.rundir import RunDir
from fedsim.simulation import run_simulation


def plain_loop(cfg: ResolvedConfig) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The same federation as fedsim's equal_avg run, as a sequential PyTorch loop that keeps
    every client's model in memory.

    Returns the per-round client metrics and the final aggregated (global) parameters."""
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
    rows = []
    assert cfg.rounds is not None
    for rnd in range(1, cfg.rounds + 1):
        replies, train_metrics = [], {}
        for pid, model in nets.items():
            model.load_state_dict(global_arrays, strict=False)
            train_metrics[pid] = task.train(model, cfg, pid, rnd, dev, callbacks=[ProgressLogger()]).metrics
            replies.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in global_arrays})
        global_arrays = {
            k: torch.from_numpy(np.mean([r[k].numpy() for r in replies], axis=0).astype(replies[0][k].numpy().dtype)) for k in shared
        }
        clients = []
        for pid, model in nets.items():
            # evaluate the received global arrays on top of the private state, as fedsim's clients
            # do, without changing the model that trains next round (it receives them anyway)
            model.load_state_dict(global_arrays, strict=False)
            ev = task.evaluate_local(model, cfg, pid, dev)
            clients.append({"client": pid, "train_accuracy": train_metrics[pid]["accuracy"], "test_accuracy": ev.metrics["accuracy"]})
        rows.append({"round": rnd, "clients": clients})
    return rows, global_arrays


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="quick")
    p.add_argument("--scenario", type=int, default=1)
    p.add_argument("--rounds", type=int)
    p.add_argument("--repeat", type=int, default=1, help="alternate both runs N times; report the fastest of each")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    enable_console_logging()
    cfg = resolve_config(RunConfig(scenario=args.scenario, profile=args.profile, rounds=args.rounds, strategy="equal_avg"))

    fed_times, plain_times = [], []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            run_cfg = dataclasses.replace(cfg, out=str(Path(tmp) / "run"))
            t0 = time.perf_counter()
            run_simulation(run_cfg)
            fed_times.append(time.perf_counter() - t0)
            fed_rows = RunDir(run_cfg.out).read_metrics()
            fed_params = RunDir(run_cfg.out).load_params()
        _cohort.cache_clear()  # the plain loop generates its data too, like fedsim's client process
        t0 = time.perf_counter()
        plain_rows, plain_params = plain_loop(cfg)
        plain_times.append(time.perf_counter() - t0)
        print(f"repeat {i + 1}/{args.repeat}: fedsim {fed_times[-1]:.1f}s, plain {plain_times[-1]:.1f}s", file=sys.stderr)
    t_fedsim, t_plain = min(fed_times), min(plain_times)

    max_param_diff = max(float(np.abs(fed_params[k] - plain_params[k].numpy()).max()) for k in fed_params)
    final_fed = [(c["train_accuracy"], c["test_accuracy"]) for c in fed_rows[-1]["clients"]]
    final_plain = [(c["train_accuracy"], c["test_accuracy"]) for c in plain_rows[-1]["clients"]]
    result = {
        "profile": cfg.profile,
        "scenario": cfg.scenario,
        "rounds": cfg.rounds,
        "local_epochs": cfg.local_epochs,
        "clients": list(cfg.client_models()),
        "fedsim_seconds": round(t_fedsim, 2),
        "plain_seconds": round(t_plain, 2),
        "ratio": round(t_fedsim / t_plain, 3),
        "all_fedsim_seconds": [round(t, 2) for t in fed_times],
        "all_plain_seconds": [round(t, 2) for t in plain_times],
        "final_metrics_equal": final_fed == final_plain,
        "max_abs_diff_final_params": max_param_diff,
        "final_fedsim": final_fed,
        "final_plain": final_plain,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {'cuda' if torch.cuda.is_available() else 'cpu'}",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"overhead-{cfg.profile}-s{cfg.scenario}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
