"""Conversational memory elements (CMEs): per-epoch relative weight changes (CME paper, sec. 3.1).

:mod:`fedsim.cme.recorder` computes them in the client (a training callback);
:mod:`fedsim.cme.archive` carries them to the server and stores/reads the run's archive.
The analysis (covariance maps, ACF, saturation, client characterisation) is in
:mod:`fedsim.analysis.cme`.
"""

from fedsim.cme.archive import (
    CMEArchive,
    CMEArchiveError,
    CMEArchiveWriter,
    NoCMERecordsError,
    RoundCME,
    decode,
    encode,
)
from fedsim.cme.recorder import FIELD, STAT_FIELDS, CMERecorder, CMESettings, EpochCME, as_jacobian

__all__ = [
    "FIELD",
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
