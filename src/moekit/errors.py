"""Errors a user can act on: the CLI prints these as one line, never as a traceback."""


class MoekitError(Exception):
    """A mistake in the input (a file, a flag, a model) with a message that says how to fix it."""


class CheckpointError(MoekitError):
    """A checkpoint directory that is missing, damaged, or not what its config.json says."""


class UnsupportedModelError(MoekitError):
    """An architecture or a config option that moekit does not implement."""
