"""Error types. Every message names the file, key, domain or tensor at fault."""


class NexusError(ValueError):
    """Base class for every error Nexus raises on bad input."""


class ConfigError(NexusError):
    """A configuration value or key is invalid."""


class CheckpointError(NexusError):
    """A checkpoint directory is missing, corrupt, or does not match its config."""


class IncompatibleModelsError(NexusError):
    """Models combined by an upcycling operation do not share an architecture."""


class DataError(NexusError):
    """A data source, split or embedding is missing, empty or malformed."""
