"""The run description: one typed run config (run.py) and the presets built on it."""
