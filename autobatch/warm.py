"""A warm start for workers: one process imports torch and TRL once, then forks each worker from there.

`python -m autobatch.warm REPLY_FD MODULE...` imports the modules, then reads one JSON request a line on
stdin (the worker's argv, environment, working directory and log file), forks, and answers on REPLY_FD with
`{"pid": N}`; when a child exits it answers `{"exit": N, "code": C}` (C as subprocess gives it: negative for
a signal). When stdin closes it ends the process groups of the workers still running, and exits.
autobatch.launch keeps one per parent and starts a worker cold when it cannot use one.

Why: a fresh worker spends its first seconds importing torch, transformers and TRL (~7 s of CPU each on a
2-core machine), and a plan starts several. Why the fork is as fresh as a new process: this process only
imports. It runs with PYTORCH_NVML_BASED_CUDA_CHECK=1, so even a CUDA availability check asks NVML and the
CUDA driver is never initialised here; a worker meets the card as a new process would (no context, no
allocator history), sets up its own session, environment, stdio and working directory, and runs its module
as `__main__` the way `python -m` does. Forking after these imports is what DataLoader workers and
datasets' `map(num_proc=...)` do every day.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import select
import signal
import sys
import traceback

#: Set in the warm process only (the workers get the environment they asked for).
NVML_CHECK = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
#: How long the loop waits for a request before it reaps exited children again.
POLL_S = 0.05


def main() -> None:
    reply_fd, modules = int(sys.argv[1]), sys.argv[2:]
    for name in modules:
        importlib.import_module(name)
    pending, live = b"", set()
    while True:
        readable, _, _ = select.select([0], [], [], POLL_S)
        live -= _reap(reply_fd)
        if not readable:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:  # the parent is done (it ended its workers) or gone: what is left of them goes too
            for pid in live:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            sys.stdout.flush()  # nothing buffered here may reach a worker's log
            sys.stderr.flush()
            started, ready = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(started)
                _child(request, reply_fd, ready)
            os.close(ready)
            os.read(started, 1)  # EOF once the child has its own session: its group can be signalled from now on
            os.close(started)
            live.add(pid)
            _send(reply_fd, {"pid": pid})


def _send(fd: int, message: dict) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def _reap(reply_fd: int) -> set[int]:
    """Report every child that has exited; their pids."""
    reaped = set()
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)
        _send(reply_fd, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _child(request: dict, reply_fd: int, ready: int) -> None:
    """In the fork: become the worker `python -m MODULE ARGS` would start, run it, and never return."""
    code = 1
    try:
        os.setsid()  # a session and process group of its own, as launch's start_new_session gives
        os.close(ready)
        os.close(reply_fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        module, *args = request["argv"]
        sys.argv = [module, *args]
        code = _run_module(module)
        atexit._run_exitfuncs()  # what a normal interpreter exit runs (temp dirs, logging's flush)
    except BaseException:  # noqa: BLE001 - whatever happens, this fork must not go back to the loop
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - a closed stream has nothing left to say
                pass
        os._exit(code)


def _run_module(module: str) -> int:
    """`python -m module`'s exit status: 0, SystemExit's code, or 1 after printing an uncaught traceback."""
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, then status 1
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    main()
