"""Failures the trainer reports as one line, without a traceback: the message says it all."""


class ConfigError(ValueError):
    """Bad flags or paths, found before any process group exists: exit status 2."""


class HeteroError(RuntimeError):
    """A failure whose message names the cause and what to do; no traceback is printed."""


class CheckpointError(HeteroError):
    pass


class TrainingDiverged(HeteroError):
    pass
