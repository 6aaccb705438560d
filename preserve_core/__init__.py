"""ppft: capability-preserving fine-tuning."""

__version__ = "0.1.0"
