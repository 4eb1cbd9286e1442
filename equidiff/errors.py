"""Errors raised at equidiff's boundaries; each message says what to do."""


class ConfigError(ValueError):
    """A configuration, path or input that equidiff cannot use, with the fix in the message."""


class DataLayoutError(ConfigError):
    """A dataset folder that is not in the expected on-disk layout."""
