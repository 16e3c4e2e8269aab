"""The common entry point of the scripts: parse the CFG, run, and turn known errors into one
plain sentence and an exit status instead of a traceback.

Exit status: 0 finished; 1 stopped early (NaN) or the disk filled up mid-run; 2 bad input or an
output folder / file that cannot be written; 130 Ctrl-C; 143 SIGTERM (SLURM time limits,
``timeout``, ``docker stop``). Ctrl-C and SIGTERM during the optimisation keep the last good
image and say why in metrics.json.
"""
from __future__ import annotations

import contextlib
import errno
import signal
import sys
import warnings

from vital.config import ConfigError, parse_cfg

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143   # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a run ends as on Ctrl-C (the render loop keeps the
    last good image); ``stopped_as`` is the reason it records."""
    stopped_as = "terminated (SIGTERM: a time limit, timeout or docker stop)"


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def signals_deferred():
    """Inside the block Ctrl-C and SIGTERM are held; on leaving it, the first one held is
    raised (KeyboardInterrupt or :class:`Terminated`), so a step that must not be cut in half
    (a batch added to running sums) finishes first. Outside the main thread nothing changes."""
    held: list[int] = []

    def hold(signum, frame):
        held.append(signum)
    try:
        previous = signal.signal(signal.SIGINT, hold), signal.signal(signal.SIGTERM, hold)
    except ValueError:   # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    if held:
        raise Terminated() if held[0] == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block SIGTERM raises :class:`Terminated`; the old handler is restored after.
    Outside the main thread (where signals cannot be handled) nothing changes."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:   # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def known_errors() -> tuple[type[BaseException], ...]:
    # bad input raises ValueError (ConfigError, ReferenceError, BankError, unknown models,
    # layers and classes are all ValueErrors) or FileNotFoundError; anything else is a bug and
    # keeps its traceback
    return (ConfigError, FileNotFoundError, ValueError)


def os_error_text(err: OSError) -> str:
    """One sentence for a failed file operation: what failed and where."""
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{where}"


@contextlib.contextmanager
def warnings_as_lines():
    """Inside the block a warning prints as one line, ``warning: <message>``, instead of
    Python's ``file:line: Category: message`` (which names whatever frame was above the
    warning, often tqdm's iterator rather than our code)."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(cfg_cls, run_fn, argv: list[str] | None = None, description: str | None = None) -> int:
    """Parse ``argv`` into ``cfg_cls``, call ``run_fn(cfg, argv)``; return the exit status.

    ``run_fn`` returns ``(anything, result)`` where ``result.stopped`` is "" when it finished
    (else the reason: "interrupted", "terminated ...", any other text is a failure, status 1).
    ``description`` heads ``--help`` (default: the CFG's docstring)."""
    cfg = parse_cfg(cfg_cls, argv, description)
    with sigterm_as_interrupt(), warnings_as_lines():
        try:
            _, result = run_fn(cfg, argv)
        except Terminated:
            print("terminated (SIGTERM) before the run had anything to save",
                  file=sys.stderr)
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C) before the run had anything to save",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        except OSError as err:   # FileNotFoundError (bad input) too
            if err.errno == errno.ENOSPC:
                print(f"error: the disk is full ({os_error_text(err)}); the run folder keeps "
                      f"what was saved before", file=sys.stderr)
                return EXIT_FAILED
            print(f"error: {os_error_text(err)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except known_errors() as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    stopped = result.stopped or ""
    if stopped.startswith("terminated"):
        return EXIT_TERMINATED
    if stopped == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_FAILED if stopped else 0
