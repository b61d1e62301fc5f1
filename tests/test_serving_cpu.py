"""Server processes end with their whole process group, also when the script that started them is stopped.

The server command is replaced by a stand-in with launch_server's process shape (a main process that forks a child
which outlives it and ignores SIGTERM, like a scheduler draining a request nobody reads), so this runs on CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from sgl_sparse.serving import ServerProcess, _LIVE

# main process: starts a SIGTERM-ignoring child, prints its pid, then sleeps (and dies on SIGTERM itself)
STAND_IN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    print(child.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stand_in(tmp_path) -> ServerProcess:
    s = ServerProcess("unused", backend="flashinfer", log_path=tmp_path / "server.log")
    s.cmd = [sys.executable, "-c", STAND_IN]
    return s


def _child_pid(s: ServerProcess) -> int:
    deadline = time.time() + 30
    while time.time() < deadline:
        lines = s.log_path.read_text().splitlines()     # the command line (several lines), then the pid
        if lines and lines[-1].strip().isdigit():
            return int(lines[-1])
        time.sleep(0.1)
    raise AssertionError("stand-in server did not start its child:\n" + s.log_path.read_text())


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_stop_kills_children_that_ignore_sigterm(tmp_path):
    s = _stand_in(tmp_path).start()
    child = _child_pid(s)
    assert _alive(child) and s.proc.pid in _LIVE
    s.stop(grace=5)
    assert s.proc.poll() is not None
    assert _wait_gone(child), "a child of the server's process group survived stop()"
    assert s.proc.pid not in _LIVE


def test_sigterm_to_the_script_kills_its_servers(tmp_path):
    """A script under a time limit (one SIGTERM, e.g. `timeout`) leaves no server behind, even while it is
    blocked waiting on the server."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from sgl_sparse.serving import ServerProcess, stop_servers_on_sigterm
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_serving_cpu import _stand_in, _child_pid
        import pathlib
        stop_servers_on_sigterm()
        s = _stand_in(pathlib.Path({str(tmp_path)!r})).start()
        print(s.proc.pid, _child_pid(s), flush=True)
        s.proc.wait()    # blocked on the server, as a script waiting for its answers is
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    main_pid, child = map(int, p.stdout.readline().split())
    assert _alive(main_pid) and _alive(child)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 143
    assert "SIGTERM (a time limit?): 1 server(s) killed, exiting with 143" in p.stderr.read()
    assert _wait_gone(main_pid) and _wait_gone(child), "the script's server outlived its SIGTERM"


def test_servers_get_their_own_distributed_port_below_the_ephemeral_range():
    from sgl_sparse.serving import ServerProcess, unassigned_port

    ports = [unassigned_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(20000 <= p <= 32767 for p in ports)
    a = ServerProcess("/m", backend="flashinfer")
    b = ServerProcess("/m", backend="flashinfer")
    pa, pb = (int(s.cmd[s.cmd.index("--nccl-port") + 1]) for s in (a, b))
    assert pa != pb and pa not in ports and pb not in ports
    given = ServerProcess("/m", backend="flashinfer", extra_args=["--nccl-port", "12345"])
    assert given.cmd.count("--nccl-port") == 1 and "12345" in given.cmd


def test_progress_reports_time_left_at_the_pace_so_far():
    from sgl_sparse.serving import Progress

    now = [100.0]
    p = Progress(4, clock=lambda: now[0])
    now[0] = 130.0
    assert p.step() == "1/4, ~90 s left"          # 30 s per unit, 3 units to go
    now[0] = 700.0
    assert p.step() == "2/4, ~10 min left"        # 300 s per unit, 2 to go
    assert p.step(5) == "4/4, done"
