"""Errors a user can cause, and how every script ends on one.

    from alexnet_lib.errors import UserError, run_main
    run_main(lambda: train(cfg))

A UserError (a bad config key, a missing or corrupt file, a dead loader or peer, preemption)
means bad input or a part that failed, not a bug: run_main prints its message as one line,
``error: ...`` (or the class's own prefix), and exits with the class's exit_status. Anything
else is a bug in this code and keeps its traceback. Ctrl-C exits with status 130.
"""
import sys


class UserError(Exception):
    """An error the user can cause or fix; the message names the key or file and what to do."""
    prefix = 'error'
    exit_status = 1


def run_main(fn, interrupted='interrupted'):
    """fn(); a UserError is one line on stderr and its exit_status, Ctrl-C is status 130."""
    try:
        return fn()
    except UserError as e:
        print(f"{e.prefix}: {e}", file=sys.stderr)
        raise SystemExit(e.exit_status) from None
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        raise SystemExit(130) from None
