"""Errors a user can cause, and how every script ends on one.

    from alexnet_lib.errors import UserError, run_main
    run_main(lambda: train(cfg))

A UserError (a bad config key, a missing or corrupt file, a dead loader or peer, preemption)
means bad input or a part that failed, not a bug: run_main prints its message as one line,
``error: ...`` (or the class's own prefix), and exits with the class's exit_status. Anything
else is a bug in this code and keeps its traceback. Ctrl-C exits with status 130 (a second
Ctrl-C while it exits is ignored). run_main is a script's top level: it ends the process.
"""
import signal
import sys
import threading


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
        if threading.current_thread() is threading.main_thread():
            # the script ends now: a second Ctrl-C does not turn its exit into a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(interrupted, file=sys.stderr)
        raise SystemExit(130) from None
