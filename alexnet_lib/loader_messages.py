"""What the trainer (alexnet_lib.parallel) and its loader process (proc_load.py) say to each
other: JSON objects, never pickles, every field's type checked, over a ZeroMQ PAIR socket in a
private folder."""

POLL_MS = 100               # liveness checks at least this often in every wait
DIR_PREFIX = 'proc_load'    # the socket's private folder: proc_load-<trainer pid>-XXXXXXXX
MAX_MESSAGE_BYTES = 1 << 16

TO_TRAINER = {'setup_ok': {}, 'ready': {'seq': (int,)},
              'error': {'seq': (int, type(None)), 'message': (str,)}}
LOAD = {'seq': (int,), 'path': (str,), 'lo': (int,), 'hi': (int,), 'buf': (int,)}


def checked_message(msg, fields):
    """msg if it is a dict whose listed fields have exactly the listed types, else None."""
    if not isinstance(msg, dict):
        return None
    for name, types in fields.items():
        if type(msg.get(name, ...)) not in types:    # exact: no bool for int
            return None
    return msg
