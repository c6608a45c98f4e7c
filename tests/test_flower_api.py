"""The Flower APIs fedsim depends on, so that an upgrade that removes one fails here, loudly,
instead of in a user's run.

``fedsim run`` drives Flower's Simulation Engine through ``flwr.simulation.run_simulation``, which
Flower has deprecated in favour of ``flwr run`` (that needs a SuperLink process and reads the app
from pyproject); it still works in flwr 1.42 and fedsim silences its deprecation notice.
"""

from __future__ import annotations

import inspect

import flwr


def test_run_simulation_still_takes_the_arguments_fedsim_passes():
    from flwr.simulation import run_simulation

    params = inspect.signature(run_simulation).parameters
    missing = {"server_app", "client_app", "num_supernodes", "backend_config"} - set(params)
    assert not missing, (
        f"flwr {flwr.__version__}: flwr.simulation.run_simulation lost {sorted(missing)}; fedsim.simulation must move to "
        "the supported path (flwr run with a local SuperLink)"
    )


def test_flowers_sampling_machinery_is_what_fedsim_seeds():
    """fedsim.server.sampling seeds Python's ``random`` around FedAvg's configure calls; that only
    works while FedAvg samples with ``strategy_utils.sample_nodes`` drawing ``random.sample``."""
    from flwr.serverapp.strategy import FedAvg, strategy_utils

    assert "random.sample(" in inspect.getsource(strategy_utils.sample_nodes)
    for method in (FedAvg.configure_train, FedAvg.configure_evaluate):
        assert "sample_nodes(" in inspect.getsource(method)
