"""Domain errors.

Every error a user can cause derives from :class:`MetaRLHFError` and carries a short
machine-readable ``type``. The CLI turns these into a message and exit code 2; the
server maps them to HTTP status codes in one place (``server/errors.py``).
"""

from __future__ import annotations


class MetaRLHFError(Exception):
    """Base class for errors caused by bad input or state, not by bugs."""

    type: str = "metarlhf_error"


class DataError(MetaRLHFError):
    """Malformed feedback data. The message names the file and line."""

    type = "invalid_data"


class ModelError(MetaRLHFError):
    """A model directory that is missing, unreadable or incompatible."""

    type = "invalid_model"


class AdapterError(MetaRLHFError):
    """An adapter that is unreadable, corrupted, or made for another base or rank."""

    type = "invalid_adapter"


class ConfigError(MetaRLHFError):
    """An invalid option or combination of options."""

    type = "invalid_config"


class Cancelled(MetaRLHFError):
    """Work stopped on request before it finished (e.g. an adaptation when the server shuts down)."""

    type = "cancelled"


class NotFoundError(MetaRLHFError):
    """A user, adapter version, job or completion that does not exist."""

    type = "not_found"


def check_text(text: str, what: str, error: type[Exception] = ConfigError) -> str:
    """``text`` if UTF-8 can encode it; else ``error`` naming ``what`` and the position.

    JSON ``\\ud800`` escapes and undecodable command-line bytes give Python strings with
    lone surrogates, which no tokenizer, SQLite or file can take: every text that enters
    the project from outside goes through here.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{what} is not valid Unicode text: character {e.start} is {text[e.start]!r} (a lone "
                    "surrogate, e.g. from a \\ud800 escape or bytes that are not UTF-8)") from None
    return text

