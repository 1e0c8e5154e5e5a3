"""Run folders and what they hold: one module per file kind, run locks, checkpoints, the run history."""
