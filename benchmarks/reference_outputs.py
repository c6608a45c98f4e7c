"""Record or check fingerprints of tiny runs: ``metrics.jsonl`` and the final global parameters.

A re-layout must not move a single bit of a run's results. This script runs a fixed set of tiny
studies through the CLI (scenarios 1 and 2, both 3D tasks, FedProx and FedAdam on small CNNs),
hashes ``metrics.jsonl`` (every line as fedsim writes it, without the fields added after the
fingerprints were recorded: the round's ``wall_s``, which differs between repeats, and the clients'
per-epoch ``epochs``) and every tensor of ``global_params.safetensors``, and
either writes those hashes (``--record``) or compares them with a stored file (``--check``).

    python benchmarks/reference_outputs.py --record benchmarks/results/reference-tiny.json
    python benchmarks/reference_outputs.py --check benchmarks/results/reference-tiny.json

Floating-point results depend on the machine's CPU kernels and thread count, so a stored
reference is only meaningful on the machine type it was made on (2-core x86_64 here, default
``--client-cpus``). Exit code 0 when everything matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = ["--models", "small_cnn,small_cnn,small_cnn"]
RUNS: dict[str, list[str]] = {
    "scenario1": ["--scenario", "1", "--profile", "tiny"],
    "scenario2": ["--scenario", "2", "--profile", "tiny"],
    "aicnet3d": ["--task", "aicnet3d", "--profile", "tiny"],
    "h3denet": ["--task", "h3denet", "--profile", "tiny"],
    "small-fedprox": ["--profile", "tiny", *SMALL, "--strategy", "fedprox", "--strategy-option", "mu=0.1"],
    "small-fedadam": ["--profile", "tiny", *SMALL, "--strategy", "fedadam", "--rounds", "3"],
}


def fingerprint(out: Path) -> dict[str, object]:
    from safetensors.numpy import load_file

    params = load_file(str(out / "global_params.safetensors"))
    return {
        "metrics.jsonl": hashlib.sha256(_fingerprinted_lines(out).encode()).hexdigest(),
        "params": {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in sorted(params.items())},
    }


#: metrics.jsonl fields newer than the stored fingerprints (line level, client level).
NEWER_FIELDS = ("wall_s",), ("epochs",)


def _fingerprinted_lines(out: Path) -> str:
    """``metrics.jsonl`` re-serialised as fedsim writes it (sorted keys), without :data:`NEWER_FIELDS`."""
    lines = []
    for text in (out / "metrics.jsonl").read_text().splitlines():
        row = {k: v for k, v in json.loads(text).items() if k not in NEWER_FIELDS[0]}
        row["clients"] = [{k: v for k, v in c.items() if k not in NEWER_FIELDS[1]} for c in row.get("clients", [])]
        lines.append(json.dumps(row, sort_keys=True) + "\n")
    return "".join(lines)


def run_one(name: str, args: list[str], workdir: Path) -> dict[str, object]:
    out = workdir / name
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", *args, "--out", str(out)], check=False, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"run {name} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    print(f"{name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return fingerprint(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the fingerprints to this JSON file")
    mode.add_argument("--check", type=Path, help="compare with the fingerprints in this JSON file")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(RUNS))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        ap.error(f"unknown runs {unknown}; valid choices: {', '.join(RUNS)}")
    with tempfile.TemporaryDirectory() as tmp:
        got = {n: run_one(n, RUNS[n], Path(tmp)) for n in names}
    if args.record:
        old = json.loads(args.record.read_text()) if args.record.exists() else {}
        args.record.write_text(json.dumps(old | got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(got)} runs into {args.record}")
        return 0
    ref = json.loads(args.check.read_text())
    bad = [n for n in names if ref.get(n) != got[n]]
    for n in names:
        print(f"{n}: {'identical' if n not in bad else 'DIFFERENT'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
