"""Studies built on fedsim runs: many in-process federations, tabulated.

:mod:`fedsim.study.cme_validation` is the CME validation study (issue 10): a grid of seeds x
scenario styles x fault conditions, per-client ground truth (leave-one-out contribution) and
baseline scores, the CME candidate statistics, and their AUROC per fault kind. Federations run
through :class:`fedsim.server.inprocess.InProcessGrid` (no Ray). Layer: above
:mod:`fedsim.analysis`, below :mod:`fedsim.cli`.

This package imports neither torch nor Flower until a study runs; :mod:`fedsim.study.stats` is
pure numpy.
"""

from fedsim.study.stats import auroc

__all__ = ["auroc"]
