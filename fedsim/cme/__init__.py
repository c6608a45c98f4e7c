"""Conversational memory elements (CMEs): per-epoch relative weight changes (CME paper, sec. 3.1).

:mod:`fedsim.cme.recorder` computes them in the client (a training callback; imports torch);
:mod:`fedsim.cme.archive` carries them to the server and stores/reads the run's archive;
:mod:`fedsim.cme.schema` defines what a record holds. The analysis (covariance maps, ACF,
saturation, client characterisation) is in :mod:`fedsim.analysis.cme`.

``CMERecorder`` and ``as_jacobian`` are loaded on first use, so reading an archive needs no torch.
"""

from typing import Any

from fedsim.cme.archive import (
    CMEArchive,
    CMEArchiveError,
    CMEArchiveWriter,
    NoCMERecordsError,
    RoundCME,
    decode,
    encode,
)
from fedsim.cme.schema import FIELD, LAG_GROUP_FIELDS, LAG_GROUPS, STAT_FIELDS, CMESettings, EpochCME

_LAZY = {"CMERecorder", "as_jacobian"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fedsim.cme import recorder

        return getattr(recorder, name)
    raise AttributeError(f"module 'fedsim.cme' has no attribute {name!r}")


__all__ = [
    "FIELD",
    "LAG_GROUPS",
    "LAG_GROUP_FIELDS",
    "STAT_FIELDS",
    "CMEArchive",
    "CMEArchiveError",
    "CMEArchiveWriter",
    "CMERecorder",
    "CMESettings",
    "EpochCME",
    "NoCMERecordsError",
    "RoundCME",
    "as_jacobian",
    "decode",
    "encode",
]
