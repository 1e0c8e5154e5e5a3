"""KTO Studio: point-and-click KTO preference fine-tuning of LLMs on a desktop GPU (or a CPU)."""

__version__ = "0.1.0"
