"""Models and where they come from: loading (load.py), their architecture (arch.py), the bundled model, the hub."""
