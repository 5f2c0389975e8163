"""Free TCP ports for the runs tests start, and a record of them.

DeepSpeed names its CPU all-reduce segment in /dev/shm after the run's MASTER_PORT, so the ports this
process handed out are exactly the segments its runs can have left (tests/conftest.py removes those at the
end of the session, and only those: another test process, a parallel worker or a user's run, keeps its own).
"""

from __future__ import annotations

import socket

HANDED_OUT: set[int] = set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    HANDED_OUT.add(port)
    return port
