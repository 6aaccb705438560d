"""The ppft command-line interface (Typer)."""
