#!/usr/bin/env python3
"""Developer entry point: works on a fresh machine with only python3.

    python3 dev.py demo [DIR]     train a tiny JAX model, checkpoint every step, restore
    python3 dev.py test [ARGS]    lint, type-check and run every test (what CI runs)
    python3 dev.py lock           update uv.lock to the newest versions the ranges allow

The development environment is ./.venv, built by uv from the committed uv.lock, so every
machine and CI get the same versions. uv itself is installed with pip into
./.venv-bootstrap on first use (unless a uv of the pinned version is already on PATH).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
BOOTSTRAP = ROOT / ".venv-bootstrap"
UV_VERSION = "0.13.9"


def _uv() -> str:
    """The path of a uv executable of UV_VERSION, installing it into .venv-bootstrap if needed."""
    found = shutil.which("uv")
    if found:
        out = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
        if out.split()[1:2] == [UV_VERSION]:
            return found
    bootstrap_bin = BOOTSTRAP / ("Scripts" if os.name == "nt" else "bin")
    uv = bootstrap_bin / ("uv.exe" if os.name == "nt" else "uv")
    if not uv.exists():
        print(f"dev.py: installing uv {UV_VERSION} into {BOOTSTRAP.name}", flush=True)
        venv.EnvBuilder(with_pip=True).create(BOOTSTRAP)
        subprocess.run(
            [str(bootstrap_bin / "python"), "-m", "pip", "install", "-qq",
             "--disable-pip-version-check", f"uv=={UV_VERSION}"],
            check=True,
        )
    return str(uv)


def _uv_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")  # use this python3, never fetch another
    env["UV_PROJECT_ENVIRONMENT"] = str(VENV)
    return env


def ensure_env() -> None:
    """Make ./.venv match uv.lock exactly (a no-op taking well under a second when it does)."""
    start = time.monotonic()
    fresh = not PY.exists()
    if fresh:
        print("dev.py: creating .venv from uv.lock", flush=True)
    subprocess.run(
        [_uv(), "sync", "--locked", "--all-packages", "--python", sys.executable,
         *([] if fresh else ["--quiet"])],
        cwd=ROOT, env=_uv_env(), check=True,
    )
    if fresh:
        print(f"dev.py: environment ready in {time.monotonic() - start:.0f} s", flush=True)


def lock() -> int:
    """Re-resolve every dependency to the newest allowed version and rewrite uv.lock."""
    return subprocess.run([_uv(), "lock", "--upgrade"], cwd=ROOT, env=_uv_env()).returncode


def run(cmd: list[str], *, activate: bool = True) -> int:
    """Run ``cmd`` in the repository; with ``activate``, .venv/bin first on PATH (the demo
    runs without it, so the commands it suggests are the ones that work in your shell)."""
    env = dict(os.environ)
    if activate:
        env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(VENV)
    env.setdefault("JAX_PLATFORMS", "cpu")
    # gcsfs's experimental HNS path probes a gRPC API the GCS emulator lacks (~60 s per call).
    env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "lock"):
        print(__doc__)
        return 2
    if argv[0] == "lock":
        return lock()
    ensure_env()
    if argv[0] == "demo":
        return run([str(BIN / "ckpt"), "demo", *argv[1:]], activate=False)
    for check in (
        [str(BIN / "ruff"), "check", "."],
        [str(BIN / "mypy"), "core", "plugins", "backends/local", "conformance_tests",
         "backends/gcs/ckpt_backend_gcs", "backends/s3/ckpt_backend_s3"],
    ):
        print(f"dev.py: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(check))}",
              flush=True)
        if run(check) != 0:
            return 1
    return run([str(PY), "-m", "pytest", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
