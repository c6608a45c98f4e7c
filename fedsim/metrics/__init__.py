"""Task metrics computed during training and evaluation (numpy only, no torch).

They sit below the client tasks that report them and the analysis that reads them back:
:mod:`fedsim.metrics.landmarks` (radial errors in mm, MRE, SD, SDR) and
:mod:`fedsim.metrics.classification` (ROC AUC and binary confusion metrics).
"""
