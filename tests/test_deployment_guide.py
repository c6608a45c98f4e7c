"""``docs/deployment.md`` stays runnable: ``benchmarks/deployment_loopback.py`` runs every bash block
of it on loopback (a block without a loopback marker would be skipped, so it is an error here),
and the flags its ``fedsim run`` and ``ray start`` commands use exist."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from benchmarks.deployment_loopback import GUIDE, guide_blocks

BLOCKS = guide_blocks(GUIDE.read_text(encoding="utf-8"))


def commands(prefix: str) -> list[list[str]]:
    """Every command line (continuations joined) of the guide starting with ``prefix``."""
    out = []
    for block in BLOCKS:
        for line in block.body.replace("\\\n", " ").splitlines():
            if line.strip().startswith(prefix):
                out.append(shlex.split(line.split(" && ")[0]))
    return out


def flags(argv: list[str]) -> set[str]:
    return {a.split("=")[0] for a in argv if a.startswith("--")}


def test_every_block_is_run_and_the_guide_covers_both_ways():
    text = "\n".join(b.body for b in BLOCKS)
    for needed in ("ray start --head", "ray start --block --address", "fedsim run --ray-address", "--client-gpus 0.5", "fedsim certs",
                   "flower-superlink", "flwr supernode register", "flower-supernode", "data-dir=", "flwr run", "flwr ls", "flwr log"):  # fmt: skip
        assert needed in text, needed
    assert [b.name for b in BLOCKS if b.mode == "background"] == ["ray-head", "ray-worker", "superlink", "supernode"]
    assert sum("own-ray" in b.names or "cluster" in b.names for b in BLOCKS) == 2  # the measured pair


def test_fedsim_run_flags_in_the_guide_exist():
    from fedsim.cli import build_parser

    parser = build_parser()
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    known = {s for a in run._actions for s in a.option_strings}
    used = [flags(c) for c in commands("fedsim run")]
    assert len(used) == 3 and all(u <= known for u in used), [u - known for u in used]


@pytest.mark.parametrize("head", [True, False])
def test_ray_start_flags_in_the_guide_exist(head):
    from ray.scripts.scripts import start

    known = {s for p in start.params for s in p.opts}
    (cmd,) = [c for c in commands("ray start") if ("--head" in c) == head]
    assert flags(cmd) <= known, flags(cmd) - known


def test_guide_names_the_files_that_exercise_it():
    text = GUIDE.read_text(encoding="utf-8")
    for path in (
        "benchmarks/deployment_loopback.py",
        "tests/integration/test_ray_cluster.py",
        "tests/integration/test_secure_deployment.py",
    ):
        assert path in text and (Path(__file__).parents[1] / path).exists()
