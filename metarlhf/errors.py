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


class NotFoundError(MetaRLHFError):
    """A user, adapter version, job or completion that does not exist."""

    type = "not_found"
