"""The client layout a simulation picks when ``--client-cpus`` is not given (issue 14):
one client at a time with every CPU, or one single-thread client per CPU, from the models'
measured thread profiles (docs/performance.md). Below :mod:`fedsim.simulation` so that config
resolution (:mod:`fedsim.clients.tasks.resolve`) can use it; ``fedsim.simulation`` re-exports it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from fedsim.config import ResolvedConfig


@dataclass(frozen=True)
class ThreadProfile:
    """How one model's local training uses a 2-core CPU (``benchmarks/overhead.py --layouts``
    measures it, quick profile; docs/performance.md): ``seconds`` of one client's training call with one
    thread and nothing else running; ``gain``: how much faster two threads make it (``seconds`` /
    the 2-thread time); ``contention``: how much slower it is while another single-thread client
    trains on the other core (memory bandwidth, caches)."""

    seconds: float
    gain: float
    contention: float

    def sequential(self, cpus: int) -> float:
        """Estimated seconds of a call with ``cpus`` threads: the 2-thread gain extrapolated linearly."""
        return self.seconds / (1 + (cpus - 1) * (self.gain - 1))

    def parallel(self) -> float:
        """Estimated seconds of a single-thread call next to other single-thread clients."""
        return self.seconds * self.contention


#: Thread profiles of the models (see :class:`ThreadProfile`); a model not listed makes the pick
#: keep one client at a time with every CPU. Measured by
#: ``python benchmarks/overhead.py --profile quick --layouts --rounds 3`` on the project's 2-core
#: machine (one repetition, load average 3 falling to 2; ``benchmarks/results/overhead-layouts-quick.json``,
#: its ``thread_profile`` per model); re-measure on a machine of another kind (docs/performance.md).
THREAD_PROFILES: dict[str, ThreadProfile] = {
    "resnet50": ThreadProfile(19.44, 1.761, 1.054),
    "densenet121": ThreadProfile(13.64, 1.054, 1.179),
    "alexnet_skip": ThreadProfile(1.79, 1.436, 1.038),
    "small_cnn": ThreadProfile(0.79, 1.207, 1.087),
}


def _makespan(seconds: list[float], workers: int) -> float:
    """When the last of these calls ends when ``workers`` actors take them in order, each the next
    call when it is free (how Flower's actor pool hands out a round's messages)."""
    free = [0.0] * workers
    for s in seconds:
        i = free.index(min(free))
        free[i] += s
    return max(free)


def pick_client_cpus(cfg: ResolvedConfig, cpus: int | None = None) -> float:
    """The client layout when ``--client-cpus`` is not given: one client at a time with all of
    this machine's ``cpus``, or ``cpus`` clients at a time with one thread each, whichever the
    models' measured :data:`THREAD_PROFILES` say trains a round faster.

    A round's estimate takes the clients that train in it (with sampling, the first
    ``sample_size()`` clients stand for any round): one after another,
    ``sum(ThreadProfile.sequential(cpus))``; in parallel, the time until the last of the
    ``ThreadProfile.parallel()`` calls ends when ``cpus`` actors take them in client order. The
    single-thread layout is picked only when its estimate is lower (:data:`THREAD_PROFILES`). Kept as before (2 CPUs per
    client, the old default): a Ray cluster (``ray_address``: its nodes are not known before
    joining) and clients with GPUs. One client at a time with every CPU: one CPU, or a model without
    a measured profile. The same config on the same machine always gives the same pick; the
    resolved ``client_cpus`` is recorded in ``config.json``, and ``--client-cpus`` overrides it.
    """
    if cfg.ray_address or cfg.client_gpus > 0:
        return 2.0
    cpus = cpus or os.cpu_count() or 1
    models = cfg.client_models()[: cfg.sample_size()]
    if cpus < 2 or any(m not in THREAD_PROFILES for m in models):
        return float(cpus)
    sequential = sum(THREAD_PROFILES[m].sequential(cpus) for m in models)
    parallel = _makespan([THREAD_PROFILES[m].parallel() for m in models], cpus)
    return 1.0 if parallel < sequential else float(cpus)


__all__ = ["THREAD_PROFILES", "ThreadProfile", "pick_client_cpus"]
