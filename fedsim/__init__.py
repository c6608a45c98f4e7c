"""fedsim: federated-learning simulation for medical imaging on Flower + Ray.

Subpackages: :mod:`fedsim.server` (ServerApp), :mod:`fedsim.clients` (ClientApp and client tasks),
:mod:`fedsim.strategies`, :mod:`fedsim.analysis`; core modules :mod:`fedsim.config`,
:mod:`fedsim.data`, :mod:`fedsim.models`, :mod:`fedsim.cli`.
"""

from fedsim._logging import logger

__version__ = "0.1.0"
__all__ = ["__version__", "logger"]
