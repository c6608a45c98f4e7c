"""The fedsim ClientApp and the client tasks."""
