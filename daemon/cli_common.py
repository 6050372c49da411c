"""What the command-line commands share: exit codes and their one-line messages."""

from __future__ import annotations

import sys
from typing import Any

EXIT_CONFIG = 2  # a configuration error: systemd does not restart (RestartPreventExitStatus)
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"livepred: error: {message}", file=sys.stderr)
    return code


def print_refusals(engine: Any) -> None:
    """Each model refused at load, and each target whose selected family is not loaded."""
    from daemon.model_setup import unserved_selections

    for (target, family), reason in sorted(engine.load_errors.items()):
        print(f"refused {target}/{family}: {reason}", file=sys.stderr)
    for target, family in sorted(unserved_selections(engine).items()):
        print(f"warning: {target}: its selected family {family} (routing_decision.json) is not"
              " loaded: every output's `pred` will be null", file=sys.stderr)
