"""Multi-site data folders: one sub-folder per hospital, the natural cross-silo split.

With ``--partition sites`` the data folder holds one folder per site, each in the task's own
layout one level down::

    DATA_DIR/<site>/<class>/...           brain_mri (class folders or the Kaggle layout)
    DATA_DIR/<site>/<class>/*.npy ...     aicnet3d (any of its layouts)
    DATA_DIR/<site>/<case>_volume.nrrd    h3denet (the authors' layout)

Every site becomes one client (client ``k`` is the ``k``-th site in sorted order) and is named
after its folder. The sites' samples are pooled into one cohort (so the global test set is drawn
from all of them, as for any partition) and the ``sites`` partitioner hands each client the rest
of its own site. The classes of a classification task must be the same at every site: a site that
lacks a class another site has is refused, naming the site.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

import numpy as np

from fedsim.data.folder import DataLayoutError

T = TypeVar("T")


class SiteLayoutError(DataLayoutError):
    """A multi-site data folder cannot be used; the message names the site."""


def site_folders(data_dir: str | Path) -> list[Path]:
    """The site folders of ``data_dir``: its non-hidden sub-folders, sorted by name."""
    root = Path(data_dir)
    if not root.is_dir():
        raise SiteLayoutError(f"data folder {root} does not exist or is not a folder; --partition sites expects DATA_DIR/<site>/...")
    sites = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not sites:
        raise SiteLayoutError(f"{root} holds no site folders; --partition sites expects one folder per site, DATA_DIR/<site>/...")
    return sites


def site_names(data_dir: str | Path) -> tuple[str, ...]:
    """The site names (folder names) of ``data_dir``, in client order; cheap (one directory listing)."""
    return tuple(p.name for p in site_folders(data_dir))


def scan_sites(
    data_dir: str | Path, scan: Callable[[Path], T], classes: Callable[[T], Collection[str]] | None = None
) -> list[tuple[str, T]]:
    """``scan`` every site folder of ``data_dir``; ``(site, result)`` in client order.

    With ``classes`` (the class names a scan result holds samples of) every site must hold the
    same classes: the first site lacking a class that another site has raises
    :class:`SiteLayoutError` naming it, the classes it lacks and the sites that have them.
    Errors of ``scan`` itself name the file, whose path names the site.
    """
    out = [(p.name, scan(p)) for p in site_folders(data_dir)]
    if classes is not None:
        found = {name: set(classes(res)) for name, res in out}
        union = set().union(*found.values())
        for name, have in found.items():
            if missing := sorted(union - have):
                holders = [n for n, h in found.items() if set(missing) & h]
                raise SiteLayoutError(
                    f"site {name!r} ({Path(data_dir) / name}) has no {', '.join(missing)} data, which site(s) {', '.join(holders)} have; "
                    "every site needs the same classes: add that class's folder to the site, or leave the class out at every site"
                )
    return out


def site_index(counts: Collection[int]) -> np.ndarray:
    """The site of every pooled sample, for sites of these sizes (in order): ``[0]*n0 + [1]*n1 + ...``."""
    return np.repeat(np.arange(len(counts), dtype=np.int64), np.asarray(list(counts), dtype=np.int64))


__all__ = ["SiteLayoutError", "scan_sites", "site_folders", "site_index", "site_names"]
