"""Training: the run plan, the engine, the one seam to TRL, the memory estimate, speed, health and the held-out watch."""
