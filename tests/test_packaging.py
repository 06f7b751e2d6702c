"""What `pip install ckpt-backend-s3` means for a user, proved with the wheels of this repo.

The four distributions are built as wheels, checked for their contents and metadata, then
installed with plain pip (no lock, not editable) into a fresh virtual environment together
with orbax-checkpoint: the published dependency ranges must resolve together, and the result
must save and restore a tree.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = {
    "ckpt_core": {"ckpt", "ckpt_backend_local", "ckpt_strategies"},
    "ckpt_backend_s3": {"ckpt_backend_s3"},
    "ckpt_backend_gcs": {"ckpt_backend_gcs"},
    "ckpt_conformance": {"ckpt_conformance"},
}
ENTRY_POINTS = {
    "ckpt_core": "[console_scripts]\nckpt = ckpt.cli:main",
    "ckpt_backend_s3": "[ckpt]\ns3 = ckpt_backend_s3",
    "ckpt_backend_gcs": "[ckpt]\ngcs = ckpt_backend_gcs",
    "ckpt_conformance": "[pytest11]\nckpt_conformance = ckpt_conformance.plugin",
}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is part of the locked dev environment"
    subprocess.run([uv, "build", "--all-packages", "--wheel", "--out-dir", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    found = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(found) == set(DISTRIBUTIONS)
    return found


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_wheel_holds_its_packages_and_nothing_else(wheels: dict[str, Path], dist: str) -> None:
    with zipfile.ZipFile(wheels[dist]) as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == DISTRIBUTIONS[dist]
    assert not [n for n in names if "/tests/" in n or "conftest" in n or "benchmark" in n]
    assert not [n for n in names if n.endswith((".pyc", ".orig", ".rej"))]


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_wheel_metadata_is_complete(wheels: dict[str, Path], dist: str) -> None:
    with zipfile.ZipFile(wheels[dist]) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(info).decode())
        entry_points = zf.read(info.replace("METADATA", "entry_points.txt")).decode()
        licenses = [n for n in zf.namelist() if "/licenses/" in n]
    assert meta["Summary"] and meta["License-Expression"] == "Apache-2.0"
    assert licenses, "the license text travels with the wheel"
    assert meta["Requires-Python"] == ">=3.11"
    assert {u.split(",")[0] for u in meta.get_all("Project-URL")} >= {"Homepage", "Source"}
    assert any(c.startswith("Programming Language :: Python :: 3")
               for c in meta.get_all("Classifier"))
    assert meta.get_payload().strip(), "the README is the long description"
    assert ENTRY_POINTS[dist] in entry_points
    requires = meta.get_all("Requires-Dist") or []
    if dist != "ckpt_core":
        # Depends on our core under its own name, never on the unrelated `ckpt` on PyPI.
        assert any(r.startswith("ckpt-core") for r in requires), requires
        assert not any(r.split(">")[0].split("=")[0].strip() == "ckpt" for r in requires)


SMOKE = textwrap.dedent(
    """
    import sys, numpy as np, ckpt, ckpt_backend_s3, ckpt_backend_gcs, orbax.checkpoint
    backends = ckpt.list_backends()
    assert {"file", "s3", "gs"} <= set(backends), backends
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": np.int32(7)}
    ckpt.Checkpointer().save(sys.argv[1] + "/1", tree)
    back = ckpt.Checkpointer().restore(sys.argv[1] + "/1")
    assert np.array_equal(back["w"], tree["w"]) and int(back["step"]) == 7
    print("OK", sorted(backends))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pip_install_backends_from_wheels_into_a_fresh_venv(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    """`pip install ckpt-backend-s3 ckpt-backend-gcs orbax-checkpoint` with plain pip."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    wheel_dir = next(iter(wheels.values())).parent
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--find-links", str(wheel_dir), "ckpt-backend-s3", "ckpt-backend-gcs",
         "orbax-checkpoint"],
        capture_output=True, text=True, env=env,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    shown = subprocess.run([str(py), "-m", "pip", "show", "ckpt-core"], capture_output=True,
                           text=True, env=env)
    assert "Name: ckpt-core" in shown.stdout
    unrelated = subprocess.run([str(py), "-m", "pip", "show", "ckpt"], capture_output=True,
                               text=True, env=env)
    assert unrelated.returncode != 0, "the unrelated `ckpt` distribution must not come in"
    smoke = subprocess.run([str(py), "-c", SMOKE, str(tmp_path / "run")], capture_output=True,
                           text=True, env=dict(env, JAX_PLATFORMS="cpu"), cwd=tmp_path)
    assert smoke.returncode == 0, smoke.stderr[-4000:]
    assert smoke.stdout.startswith("OK")
    ls = subprocess.run([str(env_dir / "bin" / "ckpt"), "backends"], capture_output=True,
                        text=True, env=env)
    assert ls.returncode == 0 and "s3" in ls.stdout and "gs" in ls.stdout, ls.stdout + ls.stderr
