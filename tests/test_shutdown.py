"""``exit_process`` (megatron_shaping/shutdown.py): the end of every distributed entry point and
test worker. It must do what a normal exit does for the user (atexit handlers run: monitors
and logs closed; buffered output written; the exit code kept) while skipping the interpreter's
finalization, where gloo's worker threads abort the process now and then. Controls: the same
script ending with ``os._exit`` loses the handler's file and the buffered output, so the checks
can tell."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    from megatron_shaping.shutdown import exit_process
    out = sys.argv[1]
    atexit.register(lambda: open(out, "w").write("closed"))
    sys.stdout.write("buffered, no newline")
    {end}
    print("not reached")
""")


@pytest.mark.parametrize("end, code, kept", [("exit_process(3)", 3, True), ("exit_process()", 0, True),
                                             ("os._exit(3)", 3, False)])
def test_exit_runs_handlers_flushes_and_keeps_the_code(tmp_path, end, code, kept):
    out = tmp_path / "handler.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}     # stdout buffered
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(end=end), str(out)], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, env=env)
    assert p.returncode == code, p.stderr
    assert (out.exists() and out.read_text() == "closed") == kept
    assert (p.stdout == "buffered, no newline") == kept, p.stdout
