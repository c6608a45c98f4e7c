"""Re-execute notebooks in place, so that they are committed with their outputs (``make notebooks``).

Each notebook runs in a fresh temporary working folder (the notebooks write their runs under
``tempfile.mkdtemp()``), with a kernel of this Python. Kept: printed results, tables and figures.
Dropped, so the committed notebooks show results rather than noise: stderr streams (Ray's and
fedsim's progress logs, with timestamps, process ids and temporary paths) and nbclient's per-cell
timing metadata. A cell that fails stops the script with its error (nothing is written then).

    python notebooks/execute.py notebooks/*.ipynb
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def execute_in_place(path: Path, timeout: int = 1800) -> int:
    """Execute ``path`` and write it back with its outputs; returns the number of figures."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False, resources={"metadata": {"path": tmp}}).execute()
    figures = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        figures += sum("image/png" in o.get("data", {}) for o in cell.outputs)
    nbformat.write(nb, path)
    return figures


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python notebooks/execute.py NOTEBOOK.ipynb ...", file=sys.stderr)
        return 2
    for name in argv:
        print(f"{name}: {execute_in_place(Path(name))} figure(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
