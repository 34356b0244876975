"""A directory built once per test run, shared by every pytest-xdist worker of that run.

A session fixture runs once per worker; an expensive input (the tiny run's warm start: minutes)
that several modules need would then be built by each worker. `built_once` builds it under a
file lock in the folder that this run's workers share, so the first worker to ask builds it and
the others wait for it, then reuse it.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path
from typing import Callable

COMPLETE = ".complete"


def built_once(config, tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """Path of the directory `name` after `build(path)` filled it, once per test run.

    config: the session's pytest config (an xdist worker's has `workerinput`; a pytest that a
    test starts inherits the worker's environment, not that). Without xdist it is a fresh
    temporary directory of this session. Under xdist it lives next to
    the workers' own base directories (in the run's base directory, which no other run uses); a
    build that failed leaves no completion mark, so the next worker to ask builds it again.
    """
    if not hasattr(config, "workerinput"):
        path = tmp_path_factory.mktemp(name)
        build(path)
        return path
    shared = tmp_path_factory.getbasetemp().parent
    path = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on an error
        if not (path / COMPLETE).exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            (path / COMPLETE).touch()
    return path
