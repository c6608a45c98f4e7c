"""Cost of CME recording: time overhead on local training, and archive size per client-round.

**Time.** For every client of the scenario (one model each), the same local training (same data,
seed and initial weights; one round of ``local_epochs``) runs twice in this process: without
callbacks, and with the :class:`~fedsim.cme.CMERecorder`. Reported per model: both wall times,
the wall-clock overhead, and the time spent inside the recorder's hooks as a fraction of the
training time without them (less sensitive to machine noise than the difference of two runs).
Takes the fastest of ``--repeat`` runs.

**Size.** Bytes of one client-round archive file (what the client sends and the server stores)
for the quick and the paper profile. The size depends only on the model's layers, the number of
local epochs and the analysis-matrix size, not on the data, so for the paper profile the recorder
runs ``local_epochs`` epochs of synthetic weight updates instead of paper-scale training.

    python benchmarks/cme_cost.py --profile quick --scenario 1 --repeat 2

Writes ``benchmarks/results/cme-cost-<profile>-s<scenario>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsim.callbacks import TrainCallback, TrainInfo
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.cme import CMERecorder, CMESettings, encode
from fedsim.config import ResolvedConfig, RunConfig


class Timed(TrainCallback):
    """Wraps a callback and sums the seconds spent in its hooks."""

    def __init__(self, inner: TrainCallback) -> None:
        self.inner, self.seconds = inner, 0.0

    def _time(self, fn: Callable[..., None], *args: Any) -> None:
        t = time.perf_counter()
        fn(*args)
        self.seconds += time.perf_counter() - t

    def on_train_start(self, model: nn.Module, info: TrainInfo) -> None:
        self._time(self.inner.on_train_start, model, info)

    def on_epoch_end(self, model: nn.Module, info: TrainInfo, epoch: int, metrics: Mapping[str, float]) -> None:
        self._time(self.inner.on_epoch_end, model, info, epoch, metrics)

    def on_train_end(self, model: nn.Module, info: TrainInfo) -> None:
        self._time(self.inner.on_train_end, model, info)


def settings(cfg: ResolvedConfig) -> CMESettings:
    return CMESettings(cfg.cme_layers or get_task(cfg.task).cme_layers, cfg.cme_threshold, cfg.cme_max_size, cfg.cme_biases, cfg.seed)


def time_client(cfg: ResolvedConfig, pid: int, dev: torch.device) -> dict[str, float]:
    task = get_task(cfg.task)
    out: dict[str, float] = {}
    for mode in ("plain", "cme"):
        torch.manual_seed(cfg.seed * 1000 + pid)
        model = task.build_model(cfg.model_for(pid), cfg)
        recorder = CMERecorder(settings(cfg)) if mode == "cme" else None
        timed = Timed(recorder) if recorder is not None else None
        t = time.perf_counter()
        task.train(model, cfg, pid, 1, dev, callbacks=[timed] if timed is not None else [])
        out[mode] = time.perf_counter() - t
        if recorder is not None and timed is not None:
            assert recorder.result is not None
            out["recorder"] = timed.seconds
            out["payload_bytes"] = len(encode(recorder.result, pid, 1, cfg.model_for(pid)))
    return out


def payload_size(cfg: ResolvedConfig, pid: int, epochs: int) -> int:
    """Archive bytes of one client-round with ``epochs`` local epochs (synthetic weight updates)."""
    task = get_task(cfg.task)
    torch.manual_seed(pid)
    model = task.build_model(cfg.model_for(pid), cfg)
    rec = CMERecorder(settings(cfg))
    info = TrainInfo(1, pid, epochs, cfg.model_for(pid))
    rec.on_train_start(model, info)
    for e in range(1, epochs + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 0.01 * torch.randn_like(p))
        rec.on_epoch_end(model, info, e, {})
    rec.on_train_end(model, info)
    assert rec.result is not None
    return len(encode(rec.result, pid, 1, cfg.model_for(pid)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--scenario", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    cfg = resolve_config(RunConfig(scenario=args.scenario, profile=args.profile, cme=True))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = get_task(cfg.task)
    task.train(
        task.build_model(cfg.model_for(0), cfg),
        resolve_config(RunConfig(scenario=args.scenario, profile=args.profile, local_epochs=1)),
        0,
        1,
        dev,
    )  # warm-up: data generation, allocator
    results = {}
    for pid in range(cfg.clients):
        name = cfg.model_for(pid)
        runs = [time_client(cfg, pid, dev) for _ in range(args.repeat)]
        best = {k: min(r[k] for r in runs) for k in ("plain", "cme", "recorder")}
        paper = resolve_config(RunConfig(scenario=args.scenario, profile="paper"))
        row = {
            "model": name,
            "local_epochs": cfg.local_epochs,
            "train_seconds_plain": round(best["plain"], 2),
            "train_seconds_cme": round(best["cme"], 2),
            "wall_overhead": round(best["cme"] / best["plain"] - 1, 4),
            "recorder_seconds": round(best["recorder"], 3),
            "recorder_fraction": round(best["recorder"] / (best["cme"] - best["recorder"]), 4),
            "archive_bytes_per_client_round": {
                args.profile: int(runs[0]["payload_bytes"]),
                "paper": payload_size(paper, pid, int(paper.local_epochs or 1)),
            },
        }
        results[name] = row
        print(json.dumps(row))
    out = {
        "profile": args.profile,
        "scenario": args.scenario,
        "repeat": args.repeat,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cme_settings": vars(settings(cfg)) | {"layers": list(settings(cfg).layers)},
        "clients": results,
    }
    path = Path(__file__).parent / "results" / f"cme-cost-{args.profile}-s{args.scenario}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
