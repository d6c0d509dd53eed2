"""The few exception types autobatch raises on purpose; the CLI maps them to exit codes."""


class AutobatchError(Exception):
    """A runtime problem the user can fix (exit 1): message is one line naming the fix.

    Below the CLI a message names config keys (`max_length`, as `autobatch.plan(max_length=...)` and YAML
    spell them) and the API's keyword arguments in backticks where they are also plain words (`plan`, `resume`,
    `overwrite`); `keys` lists those it names, which the CLI rewrites as the flags the user typed (`--max-length`).
    """

    exit_code = 1

    def __init__(self, message: str = "", keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


class ConfigError(AutobatchError):
    """Bad arguments or config (exit 2): message names the key (see `keys`) and the fix."""

    exit_code = 2


class BudgetTooSmallError(AutobatchError):
    """Even micro-batch 1 does not fit the memory budget; `trial` is the failed trial."""

    def __init__(self, message: str, trial: object = None, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message, keys)
        self.trial = trial


class Interrupted(AutobatchError):
    """Stopped by SIGTERM or SIGINT: exit 128 + the signal's number (143, 130), as a shell reports it."""

    def __init__(self, message: str, signum: int, checkpoint: str | None = None, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message, keys)
        self.exit_code = 128 + signum
        self.signum = signum
        self.checkpoint = checkpoint


class WorkerError(AutobatchError):
    """A worker process (autobatch.launch) crashed, hung past its timeout, or reported an error.

    `kind`: `crash` (non-zero exit or a signal), `timeout`, `cuda` (a CUDA error other than OOM), `oom`
    or `error` (what the worker raised); `rank`: the first rank of a group to fail, or the first still running
    at a timeout (None for a single worker).
    """

    def __init__(self, message: str, kind: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.rank = rank
