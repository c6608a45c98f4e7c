"""The fedsim ServerApp and its run directory."""
