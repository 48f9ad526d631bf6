"""``python -m pipeline``: see :mod:`pipeline.cli`."""

import signal
import sys

if __name__ == "__main__":
    # Before the imports: a Ctrl-C while they run also ends in exit status 130, not in death by the signal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        from pipeline.cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    except ImportError as exc:  # click or another core package is missing: the CLI's one line, without the CLI
        from pipeline.errors import missing_dependency

        message = missing_dependency(exc)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
    main()
