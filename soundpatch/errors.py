"""The errors soundpatch raises on purpose.

Each carries one sentence a user can act on. The CLI prints it to stderr without a
traceback; anything else escaping is a bug.
"""

from __future__ import annotations


class SoundpatchError(Exception):
    """A problem the user can fix; the message is one clear sentence."""


class ManifestError(SoundpatchError):
    """The manifest as a whole cannot be read (a bad row is not this: it becomes `invalid`)."""


class ConfigError(SoundpatchError):
    """The config file or a command-line override is not usable."""


class RowError(SoundpatchError):
    """One row cannot be processed; the message goes into that row's `error` column."""


def as_sentence(text: str, fallback: str = "Unknown error") -> str:
    """One sentence for a row's `error` column: capitalised, one closing full stop."""
    text = text.strip().rstrip(".")
    if not text:
        text = fallback
    return text[:1].upper() + text[1:] + "."
