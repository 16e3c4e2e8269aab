"""The common entry point of the scripts: parse the CFG, run, and turn known errors into one
plain sentence and an exit status instead of a traceback."""
from __future__ import annotations

import sys

from vital.config import ConfigError, parse_cfg

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def known_errors() -> tuple[type[BaseException], ...]:
    # bad input raises ValueError (ConfigError, ReferenceError, BankError, unknown models,
    # layers and classes are all ValueErrors) or FileNotFoundError; anything else is a bug and
    # keeps its traceback
    return (ConfigError, FileNotFoundError, ValueError)


def main(cfg_cls, run_fn, argv: list[str] | None = None) -> int:
    """Parse ``argv`` into ``cfg_cls``, call ``run_fn(cfg, argv)``; return the exit status."""
    cfg = parse_cfg(cfg_cls, argv)
    try:
        _, result = run_fn(cfg, argv)
    except KeyboardInterrupt:
        print("interrupted before the optimisation started; nothing to save", file=sys.stderr)
        return EXIT_INTERRUPTED
    except known_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if result.stopped == "interrupted":
        return EXIT_INTERRUPTED
    return 1 if result.stopped else 0
