"""Error types. Each carries the process exit code the CLI uses for it."""


class PPFTError(Exception):
    """A runtime failure (exit code 1): the input was fine, the run was not."""

    exit_code = 1


class RecipeError(PPFTError):
    """Bad input (exit code 2): a recipe, data file, path or override the user must fix."""

    exit_code = 2


class TrainingDiverged(PPFTError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
