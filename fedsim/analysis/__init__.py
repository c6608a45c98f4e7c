"""Convergence analysis: pure functions that return arrays, plus display classes that draw them."""

from fedsim.analysis.curves import ClientCurves, ClientCurvesDisplay, client_curves, load_client_curves

__all__ = ["ClientCurves", "ClientCurvesDisplay", "client_curves", "load_client_curves"]
