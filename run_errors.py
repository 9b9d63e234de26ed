"""How the scripts end on an expected error: one clear line on stderr and a non-zero exit,
instead of a traceback. Unexpected errors keep their traceback."""
import sys

from batch_files import BatchFileError
from config import ConfigError
from snapshot import SnapshotError

EXPECTED = (ConfigError, BatchFileError, SnapshotError, FileNotFoundError, ValueError)


def expected_errors():
    """The exception types that mean bad input or a failed part, not a bug."""
    out = list(EXPECTED)
    from train_loop import TrainingStopped
    out.append(TrainingStopped)
    for mod, name in (('proc_load', 'LoaderError'), ('exchange', 'ExchangeError'),
                      ('launch', 'WorkerFailed')):
        try:
            out.append(getattr(__import__(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def run_main(fn):
    """Run fn(); an expected error is one line 'error: ...' and exit status 1; Ctrl-C is 130."""
    errors = expected_errors()
    try:
        return fn()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1)
