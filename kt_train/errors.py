"""Errors a user can cause. Each message names the fix; the CLI prints it, the API maps it to 4xx."""

from __future__ import annotations


class KTError(Exception):
    """Base class of every error caused by user input (config, data, model specs, weights)."""


class ConfigError(KTError):
    """A config key is unknown, missing, or has a value out of range."""


class ModelSpecError(KTError):
    """A model spec string cannot be parsed or names a model that does not exist."""


class WeightsNotFoundError(KTError):
    """Weights named by a spec are neither a local file nor in the local cache (and we are offline)."""


class DatasetError(KTError):
    """A dataset is missing, empty, malformed, or has a class without images."""


class TrainingError(KTError):
    """Training diverged (non-finite loss); the fix is usually a lower learning rate."""
