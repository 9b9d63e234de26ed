"""How the scripts end on an expected error: one clear line on stderr and a non-zero exit,
instead of a traceback. Unexpected errors keep their traceback."""
import sys

from batch_files import BatchFileError
from config import ConfigError
from snapshot import SnapshotError

EXPECTED = (ConfigError, BatchFileError, SnapshotError, FileNotFoundError, ValueError)


def expected_errors():
    """The exception types that mean bad input or a failed part, not a bug."""
    from exchange import ExchangeError
    from launch import WorkerFailed
    from proc_load import LoaderError
    from train_loop import TrainingStopped
    return EXPECTED + (TrainingStopped, LoaderError, ExchangeError, WorkerFailed)


def run_main(fn):
    """Run fn(); an expected error is one line 'error: ...' and exit status 1; Ctrl-C is 130."""
    errors = expected_errors()
    from train_loop import Preempted
    try:
        return fn()
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        raise SystemExit(143)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1)
