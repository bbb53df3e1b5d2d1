"""The one exception type a user should see as a message, and the wrapper that shows it."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import NoReturn


class PipelineError(Exception):
    """Bad input or a failed precondition, described in words a user can act on."""


def run_stage(main: Callable[[], object]) -> NoReturn:
    """Run a command's main(); show a PipelineError as one message, never a traceback.

    SIGTERM is turned into KeyboardInterrupt so that cleanup (e.g. marking an MLflow run
    KILLED) happens on `kill` as on Ctrl-C.
    """
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        code = main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
