"""How a process of a distributed (gloo) job ends: :func:`exit_process`.

PyTorch's gloo backend (torch 2.13) runs every collective on a worker thread, and that thread
can hold the last reference to a finished collective, with the Python tensors it used, a moment
after the caller has moved on. If the interpreter has begun finalizing by then, the thread
cannot take the GIL to release them: it exits while unwinding the destructor and the process
aborts ("terminate called without an active exception", exit code -6) after all its work was
done. gdb on the core: ``ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> decref_pyobject ->
take_gil -> PyThread_exit_thread -> std::terminate``. On a 2-core host with two ranks, 2-4 of
8 launches of a script that only all-reduces once ended this way. ``destroy_process_group()``
before the end avoids it only when nothing else holds the group; DeepSpeed's engines and
optimizers do.
"""
from __future__ import annotations

import atexit
import os
import sys


def exit_process(code: int = 0) -> None:
    """End the process with ``code``: the atexit handlers run (monitors and log files closed
    and flushed, as at a normal exit), stdout and stderr are flushed, and the process exits
    without the interpreter's finalization, where the race above lives. Call it last, on every
    rank, once the work is done (an exception before it takes Python's normal exit path)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):      # closed or broken stream: nothing left to write
            pass
    os._exit(code)
