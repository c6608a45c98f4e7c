"""Convergence analysis (CME covariance maps, ACF, saturation): see the CME issue."""
