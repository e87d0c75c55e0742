"""What a long command prints before it goes quiet."""

from __future__ import annotations


def starting(what: str) -> None:
    """One line before a simulation-engine command: checks come first, then Flower's engine starts."""
    print(f"{what}: checking exports and keys, then starting Flower's simulation engine "
          "(its start-up takes 10-30 s)...", flush=True)
