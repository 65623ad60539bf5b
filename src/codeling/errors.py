"""Errors that reach the user as one line and exit status 2."""


class CodelingError(Exception):
    """An input problem the user can fix: the message names the value and the fix.

    The command line prints the message on one line and exits with status 2,
    without a traceback.
    """


class ConfigError(CodelingError):
    """One or more invalid config values; `problems` lists each one."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        if len(self.problems) == 1:
            message = f"invalid {source}: {self.problems[0]}"
        else:
            joined = "; ".join(self.problems)
            message = f"invalid {source} ({len(self.problems)} problems): {joined}"
        super().__init__(message)


class CheckpointError(CodelingError):
    """A checkpoint that is missing, truncated, corrupt or does not match the run."""


class SourceUnreachableError(CodelingError):
    """A data source that needs the network (a Hugging Face Hub dataset) cannot be reached."""
