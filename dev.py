#!/usr/bin/env python3
"""Developer entry point: works on a fresh machine with only python3.

    python3 dev.py demo [DIR]     train a tiny JAX model, checkpoint every step, restore
    python3 dev.py test [ARGS]    lint, type-check and run every test (what CI runs)

It creates ./.venv on first use and installs ckpt, its backends, the conformance suite and
the test tools into it (again only when a pyproject.toml changed).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".ckpt-installed"
PROJECTS = [".", "conformance_tests", "backends/s3", "backends/gcs"]


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for project in PROJECTS:
        pyproject = ROOT / project / "pyproject.toml"
        if pyproject.exists():
            digest.update(pyproject.read_bytes())
    return digest.hexdigest()


def ensure_env() -> None:
    if not PY.exists():
        print("dev.py: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    fingerprint = _fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return
    print("dev.py: installing ckpt and its test tools into .venv (about a minute)", flush=True)
    args = [str(PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    editable = []
    for project in PROJECTS:
        if (ROOT / project / "pyproject.toml").exists():
            spec = f"{ROOT / project}[dev]" if project == "." else str(ROOT / project)
            editable += ["-e", spec]
    subprocess.run([*args, *editable], check=True)
    STAMP.write_text(fingerprint)


def run(cmd: list[str]) -> int:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("JAX_PLATFORMS", "cpu")
    # gcsfs's experimental HNS path probes a gRPC API the GCS emulator lacks (~60 s per call).
    env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    ensure_env()
    if argv[0] == "demo":
        return run([str(BIN / "ckpt"), "demo", *argv[1:]])
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
