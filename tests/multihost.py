"""Start N real processes of tests/multihost_worker.py on a loopback jax.distributed job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_job(
    scenario: str,
    root: str,
    processes: int,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    **options: Any,
) -> list[dict[str, Any]]:
    """Run one job of ``processes`` workers; their results in process order (a process
    that died has ``{"died": returncode}``)."""
    port = free_port()
    extra = [x for k, v in options.items() for x in (f"--{k}", str(v))]
    child_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    child_env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                scenario,
                root,
                "--process",
                str(i),
                "--processes",
                str(processes),
                "--port",
                str(port),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env,
        )
        for i in range(processes)
    ]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            results.append({"died": proc.returncode, "stderr": stderr[-3000:]})
        else:
            results.append(json.loads(line[len("RESULT ") :]))
    return results
