"""Error types. Each carries the process exit code the CLI uses for it."""


class PPFTError(Exception):
    """A runtime failure (exit code 1): the input was fine, the run was not."""

    exit_code = 1


class RecipeError(PPFTError):
    """Bad input (exit code 2): a recipe, data file, path or override the user must fix."""

    exit_code = 2


class TrainingDiverged(PPFTError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# gloo, NCCL's watchdog, and gloo when the other rank's process is gone
_COLLECTIVE_FAILURES = ("Timed out waiting", "collective operation timeout", "Connection closed by peer")


def hint_for(error: BaseException) -> str | None:
    """A next step for an environment failure that is not ppft's own error, or None.

    A distributed collective that times out (gloo: 'Timed out waiting 2000ms ...'; NCCL's watchdog: 'collective
    operation timeout') or whose peer went away surfaces from torch as a bare RuntimeError; name the setting.
    """
    text = str(error)
    if isinstance(error, RuntimeError) and any(marker in text for marker in _COLLECTIVE_FAILURES):
        return (
            "a collective (barrier / all-reduce) across processes timed out or lost a peer: one rank was slower "
            "than training.distributed.timeout_s allows (torch's default: 30 min, 10 under NCCL) or died. Check "
            "the other ranks' logs first; if one rank works alone for long (sampling a large calibration, writing "
            "checkpoints to slow storage), raise training.distributed.timeout_s."
        )
    return None
