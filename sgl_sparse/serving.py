"""Start and stop real SGLang servers (``python -m sglang.launch_server``) for tests, the demo and benchmarks.

    with ServerProcess(model_dir, backend="sgl_sparse", sparse_config="quest") as server:
        requests.post(server.url + "/generate", json={...})

The sparse backend's flags are added for you: ``--attention-backend sgl_sparse --sparse-config X --page-size P``
(P from the config). The dense baseline is ``backend="flashinfer"`` (always named explicitly: SGLang's automatic
choice may pick a backend the host does not have).

A server runs in its own process group (launch_server forks a scheduler and a detokenizer). ``stop()`` ends the
whole group: SIGTERM, then SIGKILL for whatever is left once the main process has exited or 30 s have passed (a
scheduler draining a request that nobody will read never exits by itself). Scripts that may be stopped by a time
limit call :func:`stop_servers_on_sigterm` so a SIGTERM kills their servers before anything waits on them.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import SparseConfig


_HANDED_OUT: set[int] = set()      # ports unassigned_port() gave to servers of this process


def unassigned_port(low: int = 20000, high: int = 32767) -> int:
    """A free port below Linux's default ephemeral range (32768..60999, where the OS places sockets bound to port
    0), not handed out before by this process. SGLang binds its torch.distributed port long after choosing it
    (after imports and model load); a port from the ephemeral range can meanwhile go to any socket on the host."""
    rng = random.Random()
    for port in rng.sample(range(low, high + 1), min(400, high + 1 - low)):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise ServerError(f"no free port in {low}..{high}")


def server_command(model: str, *, backend: str, sparse_config: str | None = None, port: int,
                   extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The ``launch_server`` command line for ``backend`` (``flashinfer`` or ``sgl_sparse``)."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--attention-backend", backend]
    if backend == "sgl_sparse":
        config = SparseConfig.load(sparse_config or "quest")
        cmd += ["--sparse-config", str(sparse_config or "quest")]
        if "--page-size" not in extra_args:
            cmd += ["--page-size", str(config.sglang_page_size)]
    elif sparse_config is not None:
        raise ValueError(f"sparse_config={sparse_config!r} needs backend='sgl_sparse'")
    return cmd + list(extra_args)


def file_safe(text: str) -> str:
    """``text`` as a file-name part: letters, digits, ``-`` and ``_`` kept, anything else ``_``
    (``quest-fast:reselect_min_cosine=-1`` -> ``quest-fast_reselect_min_cosine_-1``)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


class ServerError(RuntimeError):
    pass


class Progress:
    """Units of work done out of a known total, with the time left at the mean pace so far (for the long scripts
    that drive servers): ``Progress(12).step()`` -> ``"1/12, ~5 min left"``."""

    def __init__(self, total: int, clock=time.monotonic):
        self.total, self.done, self.clock = max(1, total), 0, clock
        self.start = clock()

    def step(self, n: int = 1) -> str:
        self.done = min(self.total, self.done + n)
        left = (self.clock() - self.start) / self.done * (self.total - self.done)
        when = f"~{left:.0f} s left" if left < 120 else f"~{left / 60:.0f} min left"
        return f"{self.done}/{self.total}, {when if self.done < self.total else 'done'}"


_LIVE: dict[int, "ServerProcess"] = {}   # started and not yet stopped, by process-group id


def kill_live_servers() -> None:
    """SIGKILL the process group of every server this process started and has not stopped (no waiting)."""
    for pgid in list(_LIVE):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _LIVE.pop(pgid, None)


atexit.register(kill_live_servers)


def stop_servers_on_sigterm(exit_code: int = 143) -> None:
    """Install a SIGTERM handler (main thread) that kills this process's servers, then raises ``SystemExit``.

    Killing first matters: ``SystemExit`` unwinds through ``with`` blocks that may wait on the servers (a thread
    pool finishing its queued requests, a server draining them), and a time limit such as ``timeout`` sends one
    SIGTERM only. Python's default SIGTERM action ends the process without running any cleanup at all.
    """
    def handler(signum, frame):
        servers = len(_LIVE)
        kill_live_servers()
        # said first: the requests in flight to the killed servers fail next, with errors of their own
        print(f"SIGTERM (a time limit?): {servers} server(s) killed, exiting with {exit_code}", file=sys.stderr,
              flush=True)
        raise SystemExit(exit_code)

    signal.signal(signal.SIGTERM, handler)


class ServerProcess:
    """A ``launch_server`` subprocess with its log in ``log_path``; waits until ``/health_generate`` answers."""

    def __init__(self, model: str, *, backend: str, sparse_config: str | None = None,
                 extra_args: list[str] | tuple[str, ...] = (), log_path: str | Path | None = None,
                 port: int | None = None, env: dict | None = None):
        self.port = port or unassigned_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if "--nccl-port" not in extra_args:
            # SGLang picks its torch.distributed port from the OS's ephemeral range and binds it late: servers
            # started at once collided there (EADDRINUSE). One from below that range, unique in this process,
            # as the HTTP port.
            extra_args = [*extra_args, "--nccl-port", str(unassigned_port())]
        self.cmd = server_command(model, backend=backend, sparse_config=sparse_config, port=self.port,
                                  extra_args=extra_args)
        self.log_path = Path(log_path or f"/tmp/sglang-{backend}-{sparse_config or 'dense'}-{self.port}.log")
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self._log.write(" ".join(self.cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        _LIVE[self.proc.pid] = self                      # start_new_session: the group id is the pid
        return self

    def alive(self) -> bool:
        """Started and not exited."""
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 600.0) -> "ServerProcess":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise ServerError(f"server exited with code {self.proc.returncode}; log {self.log_path}:\n"
                                  + self.log_tail())
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=30) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"server not ready after {timeout:.0f} s; log {self.log_path}:\n" + self.log_tail())

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> None:
        """End the server's process group: SIGTERM, wait up to ``grace`` s for the main process, then SIGKILL the
        group (children that outlive the main process included)."""
        if self.proc is not None:
            pgid = self.proc.pid
            if self.proc.poll() is None:
                try:
                    os.killpg(pgid, signal.SIGTERM)
                    self.proc.wait(timeout=grace)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    pass
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self.proc.poll() is None:
                self.proc.wait(timeout=10)
            _LIVE.pop(pgid, None)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
