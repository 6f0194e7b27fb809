"""Named exceptions for user-facing mistakes.

Every error a user can cause derives from :class:`FedshiftError`. The CLI turns
these into one-line messages and a non-zero exit code, without a traceback.
Messages follow one pattern: what was expected, what was given, and the fix.
"""

from __future__ import annotations


class FedshiftError(ValueError):
    """A mistake in user input (config, data, weights, arguments)."""


class ConfigError(FedshiftError):
    """A configuration value is missing, malformed or out of range."""


class DataError(FedshiftError):
    """A dataset cannot be read or does not have the expected layout."""


class BackboneError(FedshiftError):
    """A backbone name is unknown or its weights do not fit the model."""


class CheckpointError(FedshiftError):
    """A checkpoint is missing, incomplete or does not match the model."""


class PrivacyError(FedshiftError):
    """A privacy setting is missing or impossible, or the privacy ledger cannot be trusted."""


class BudgetExhaustedError(PrivacyError):
    """Training would spend more privacy budget than the site allows."""


class RoundRefusedError(PrivacyError):
    """A training round the site does not run (out of order, or beyond the run's rounds); nothing charged."""


class LedgerError(PrivacyError):
    """The privacy ledger on disk is corrupt, inconsistent or cannot be written."""


class BundleError(FedshiftError):
    """A site model bundle is missing, incomplete, corrupt or built on other backbone weights."""
