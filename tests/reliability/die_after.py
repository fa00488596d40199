"""`python die_after.py METHOD COUNT DMSTAB_ARGS...`: `dmstab DMSTAB_ARGS`, which SIGKILLs itself
the moment its COUNT-th `MlflowClient.METHOD` call returns (e.g. `create_run 1`: a run that exists
in the store and nothing more). A kill -9 at an exact point of the tracking protocol, which
polling for files from outside can only hit by chance. Run as a script: it imports only dmstab."""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Any

from mlflow.tracking import MlflowClient


def die_after(method: str, count: int) -> None:
    """Make the `count`-th call of `MlflowClient.method` end this process once it returns."""
    original = getattr(MlflowClient, method)
    calls = 0

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        result = original(*args, **kwargs)
        calls += 1
        if calls == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(MlflowClient, method, wrapped)


if __name__ == "__main__":
    die_after(sys.argv[1], int(sys.argv[2]))
    sys.argv = ["dmstab", *sys.argv[3:]]
    from dmstab.cli import main

    main()
