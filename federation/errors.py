"""Errors a user can cause, each turned into one clear line by the CLI.

Anything raised from here is the user's to fix (a bad file, a wrong key, a parameter out of
range). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedriskError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(FedriskError):
    """A run parameter is missing or out of range (names the parameter)."""


class DataError(FedriskError):
    """A hospital file is missing, unreadable or does not match the export schema."""


class KeyMaterialError(FedriskError):
    """A CKKS context is of the wrong kind for its holder, or does not match the federation."""


class CodecRangeError(FedriskError):
    """A value to encrypt lies outside the range the CKKS parameters can carry exactly."""


class PrivacyBudgetError(FedriskError):
    """A privacy requirement cannot be met (e.g. delta not below 1/n for a hospital)."""


class ProtocolError(FedriskError):
    """A federation message is malformed, or a round could not gather enough replies."""


def warn_user(message: str) -> None:
    """Tell the person running fedrisk something they need to know that is not an error (one line
    on stderr, `fedrisk: warning: ...`). Never carries record values: callers pass counts and names."""
    import sys

    print(f"fedrisk: warning: {message}", file=sys.stderr, flush=True)
