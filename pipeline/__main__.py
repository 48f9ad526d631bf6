"""``python -m pipeline`` and the ``kdpipe`` console script: see :mod:`pipeline.cli`."""

import os
import sys

from pipeline import interrupts


def main() -> None:
    """Both entry points: the CLI, or its one-line error when click or torch cannot be imported (the CLI's
    promise, kept before the CLI exists), and exit status 130 for a Ctrl-C while the imports run."""
    interrupts.catch()  # before the imports: not death by the signal, and not lost inside one
    try:
        from pipeline.cli import main as cli_main

        interrupts.check()
    except KeyboardInterrupt:
        sys.exit(130)
    except ImportError as exc:  # click or another core package is missing: the CLI's one line, without the CLI
        from pipeline.errors import missing_dependency

        message = missing_dependency(exc)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
    try:
        cli_main()
    except SystemExit as exc:
        if exc.code != 130:
            raise
        # Interrupted, and the cleanup is done: leave before the interpreter's shutdown, which under `-m` can
        # report death by SIGINT (-2) instead of 130 where the Ctrl-C landed early in training (CPython 3.11).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


if __name__ == "__main__":
    main()
