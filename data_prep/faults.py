"""The one fault-injection seam: tests make a process fail at a named point through one variable.

    UPCYCLE_FAULT="<point>@<step>:<action>[,<point>@<step>:<action> ...]"

Points (each called once per step by the code that owns it; docs/design.md §7):
    prep.before_rename    a shard's .bin/.idx are written and fsynced, not yet renamed
    prep.after_rename     the shards of a step are in place, the prep state not yet updated
    prep.after_state      the prep state records the step
    checkpoint.before_latest   (rank 0) DeepSpeed's files are written, run_state.json and `latest` are not
    universal.convert     (rank 0; step = the checkpoint's) DeepSpeed's converter has started for a resume
                          under another topology, rank 0's heartbeat is running
    train.teardown        (each rank; step = the rank) the run is finished and saved, the process groups
                          are shut down, the rank's clean exit not yet recorded
Actions:
    abort   SIGABRT this process, as a C++ std::terminate in a library thread would
    kill    SIGKILL this process (nothing runs after it: no cleanup, no atexit)
    pause   print a line and sleep PAUSE_SECONDS, so that a test can kill the process from outside

Unset (every normal run), `fault_point` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "UPCYCLE_FAULT"
PAUSE_SECONDS = 120
ACTIONS = ("kill", "pause", "abort")


def fault_spec(point: str, step: int, action: str) -> str:
    """The value of UPCYCLE_FAULT that fires `action` at `point` of `step` (for tests)."""
    if action not in ACTIONS:
        raise ValueError(f"fault action {action!r}: expected one of {ACTIONS}")
    return f"{point}@{step}:{action}"


def pause_banner(point: str, step: int) -> str:
    """The line a `pause` prints (tests wait for it before killing the process)."""
    return f"fault injection: pausing {PAUSE_SECONDS} s at {point} of step {step}"


def fault_point(point: str, step: int) -> None:
    """Fire the action UPCYCLE_FAULT asks for at `point` of `step`; nothing when it asks for none."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        where, _, action = item.strip().rpartition(":")
        if where != f"{point}@{step}":
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "abort":
            os.abort()
        elif action == "pause":
            print(pause_banner(point, step), flush=True)
            time.sleep(PAUSE_SECONDS)
        else:
            raise ValueError(f"{FAULT_ENV}={spec!r}: unknown action {action!r}; expected one of {ACTIONS}")
