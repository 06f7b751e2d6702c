"""A third-party strategy, defined only here and registered through the public hook, takes
part in everything: save, restore, discovery, cleanup, delete, force, partial saves, the
manager with retention, ``ckpt ls``/``gc`` and the conformance suite. The core never names
a strategy (checked below), and the core's modules import without cycles.

The ``stash`` layout is deliberately unlike the built-ins': writers write into
``<root>/.stash/<final>@<token>/``; the commit is a conditional create of
``<final>/commit_success.txt`` whose last line is ``stash: <final>@<token>``; a forced save
rewrites that marker. Importing this module registers it for the rest of the session, as
an installed plugin would be (so later conformance suites, S3's and GCS's included, run it).
"""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner
from upath import UPath

import ckpt
from ckpt import _sync
from ckpt.backend import Backend, Entry
from ckpt.cli import app
from ckpt.errors import CommitConflictError
from ckpt.layout import COMMIT_SUCCESS_FILE, commit_marker_text, is_commit_marker, unique_token
from ckpt.plugins import manager
from ckpt.strategy import Scan, TemporaryPath
from ckpt_conformance import BackendConformance

STASH = ".stash"
_LINE = "stash: "


async def _named(backend: Backend, final: UPath) -> str | None:
    """The stash directory the marker of ``final`` names; None without one; ValueError if
    the marker cannot be read as one."""
    try:
        text = (await backend.read_bytes(final / COMMIT_SUCCESS_FILE)).decode()
    except FileNotFoundError:
        return None
    if not is_commit_marker(text):
        raise ValueError(f"unreadable marker in {final}")
    for line in text.splitlines():
        if line.startswith(_LINE):
            return line[len(_LINE) :].strip()
    return None


class StashTemporaryPath(TemporaryPath):
    name = "stash"
    requires = ("conditional_put",)

    @classmethod
    def from_final(
        cls, final_path: Any, *, backend: Backend | None = None, file_options: Any = None
    ) -> StashTemporaryPath:
        final = ckpt.registry.to_path(final_path)
        if "@" in final.name or final.name == STASH:
            raise ValueError(f"not a final name: {final}")
        tmp = final.parent / STASH / f"{final.name}@{unique_token()}"
        return cls(tmp, final, backend=backend, file_options=file_options)

    @classmethod
    def from_temporary(
        cls, temporary_path: Any, *, backend: Backend | None = None, file_options: Any = None
    ) -> StashTemporaryPath:
        tmp = ckpt.registry.to_path(temporary_path)
        final = tmp.parent.parent / tmp.name.split("@", 1)[0]
        return cls(tmp, final, backend=backend, file_options=file_options)

    async def create(self) -> UPath:
        if not self.replace_existing and await self.backend.exists(
            self.get_final() / COMMIT_SUCCESS_FILE
        ):
            raise CommitConflictError(f"{self.get_final()} is committed")
        await self.backend.mkdir(self.get().parent, parents=True, exist_ok=True)
        await self.backend.mkdir(self.get(), parents=False, exist_ok=False)
        await self._write_initial_metadata()
        return self.get()

    async def finalize(self) -> None:
        tmp, final, backend = self.get(), self.get_final(), self.backend
        await self._write_commit_metadata()
        await backend.sync_tree(tmp)
        marker = f"{commit_marker_text(str(final))}\n{_LINE}{tmp.name}\n".encode()
        old = await _named(backend, final) if self.replace_existing else None
        if self.replace_existing and await backend.exists(final / COMMIT_SUCCESS_FILE):
            await backend.write_bytes(final / COMMIT_SUCCESS_FILE, marker)  # one atomic switch
            if old:
                await backend.remove_tree(final.parent / STASH / old)
            return
        try:
            await backend.create_exclusive(final / COMMIT_SUCCESS_FILE, marker)
        except FileExistsError as exc:
            await self.discard()
            raise CommitConflictError(f"{final} was committed by another writer") from exc
        await backend.sync_dir(final)

    @classmethod
    async def validate(cls, temporary_path: Any, *, backend: Backend | None = None) -> None:
        tmp = ckpt.registry.to_path(temporary_path)
        backend = backend or ckpt.get_backend(tmp)
        if await backend.is_link(tmp) or not await backend.is_dir(tmp):
            raise ckpt.ValidationError(f"{tmp} is not a stash directory")
        if tmp.parent.name != STASH:
            raise ckpt.ValidationError(f"{tmp} is not in {STASH}")

    @classmethod
    async def validate_final(cls, final_path: Any, *, backend: Backend | None = None) -> None:
        final = ckpt.registry.to_path(final_path)
        backend = backend or ckpt.get_backend(final)
        if not await cls.is_finalized(backend, final):
            raise ckpt.ValidationError(f"{final} is not committed")

    @classmethod
    def _candidates(cls, entries: list[Entry]) -> list[str]:
        return [
            e.name
            for e in entries
            if e.is_dir and not e.is_link and e.name != STASH and ckpt.TMP_DIR_SUFFIX not in e.name
        ]

    @classmethod
    async def finalized_names(
        cls, backend: Backend, base: UPath, entries: list[Entry]
    ) -> list[str]:
        names = cls._candidates(entries)
        found = await backend.exists_in_children(base, names, COMMIT_SUCCESS_FILE)
        return [n for n, ok in zip(names, found, strict=True) if ok]

    @classmethod
    async def is_finalized(cls, backend: Backend, path: UPath) -> bool:
        if path.name == STASH or await backend.is_link(path):
            return False
        return await backend.exists(path / COMMIT_SUCCESS_FILE)

    @classmethod
    async def is_temporary(cls, backend: Backend, path: UPath) -> bool:
        if await backend.is_link(path) or not await backend.is_dir(path):
            return False
        if path.parent.name == STASH and "@" in path.name:
            try:
                return await _named(backend, cls.from_temporary(path).get_final()) != path.name
            except ValueError:
                return False
        return False

    @classmethod
    async def scan(cls, backend: Backend, root: UPath, entries: list[Entry]) -> Scan:
        scan = Scan(finalized=await cls.finalized_names(backend, root, entries))
        if STASH not in {e.name for e in entries if e.is_dir}:
            return scan
        scan.internal.append(STASH)
        stashed = [
            e.name
            for e in await backend.list_dir(root / STASH)
            if e.is_dir and not e.is_link and "@" in e.name
        ]
        finals = sorted({n.split("@", 1)[0] for n in stashed})

        async def named(final: str) -> str | None:
            try:
                return await _named(backend, root / final)
            except ValueError:
                return "<keep all>"

        winners = dict(zip(finals, await asyncio.gather(*map(named, finals)), strict=True))
        for name in stashed:
            won = winners[name.split("@", 1)[0]]
            if won != "<keep all>" and won != name:
                scan.temporary.append(cls.from_temporary(root / STASH / name, backend=backend))
        return scan

    @classmethod
    async def content_path(cls, backend: Backend, final: UPath) -> UPath | None:
        try:
            name = await _named(backend, final)
        except ValueError:
            return None
        return final.parent / STASH / name if name else None

    @classmethod
    async def delete(cls, backend: Backend, final: UPath) -> None:
        name = await _named(backend, final)
        await backend.remove_file(final / COMMIT_SUCCESS_FILE)  # uncommit first
        if name:
            await backend.remove_tree(final.parent / STASH / name)
        await backend.remove_tree(final)


class StashPlugin:
    @ckpt.hookimpl
    def register_strategies(self, register: Any) -> None:
        register("stash", StashTemporaryPath)


if manager.pm.get_plugin("test-stash") is None:
    manager.register(StashPlugin(), "test-stash")


def tree(v: int) -> dict[str, Any]:
    return {"w": np.full((64, 8), v, np.float32), "step": v}


def stash_dirs(root: Path) -> list[str]:
    return sorted(os.listdir(root / STASH)) if (root / STASH).is_dir() else []


# -- the conformance suite runs it --------------------------------------------------------


class TestStashConformance(BackendConformance):
    fault_sample = 2  # every call is failed for the built-in strategies in test_local_conformance

    @pytest.fixture
    def ckpt_root(self, tmp_path: Path) -> str:
        return str(tmp_path / "root")


def test_conformance_parametrizes_every_registered_strategy() -> None:
    from ckpt_conformance.suite import strategy_names

    assert "stash" in strategy_names()
    assert set(strategy_names()) == set(ckpt.list_strategies())


# -- the core uses it through the public API ------------------------------------------------


def test_save_restore_force_delete(tmp_path: Path) -> None:
    ckptr = ckpt.Checkpointer("stash")
    ckptr.save(tmp_path / "1", tree(1))
    (first,) = stash_dirs(tmp_path)
    assert os.listdir(tmp_path / "1") == [COMMIT_SUCCESS_FILE]  # its own layout
    where = _sync.run(ckpt.content_path(ckpt.get_backend(tmp_path), UPath(tmp_path / "1")))
    assert where.name == first
    assert ckptr.restore(tmp_path / "1")["step"] == 1
    # read under another configured strategy: the owner is found through the registry
    assert ckpt.Checkpointer("commit_file").restore(tmp_path / "1")["step"] == 1
    ckptr.save(tmp_path / "1", tree(2), force=True)
    assert ckptr.restore(tmp_path / "1")["step"] == 2
    assert first not in stash_dirs(tmp_path) and len(stash_dirs(tmp_path)) == 1
    assert ckpt.path_state(tmp_path / "1", atomicity="stash") is ckpt.PathState.FINALIZED
    _sync.run(ckpt.delete_checkpoint(ckpt.get_backend(tmp_path), UPath(tmp_path / "1")))
    assert not (tmp_path / "1").exists() and stash_dirs(tmp_path) == []


def test_discovery_and_cleanup(tmp_path: Path) -> None:
    ckptr = ckpt.Checkpointer("stash")
    for step in (1, 2):
        ckptr.save(tmp_path / str(step), tree(step))
    live = StashTemporaryPath.from_final(tmp_path / "3")
    _sync.run(live.create())
    assert ckpt.checkpoint_steps(tmp_path, atomicity="stash") == [1, 2]
    found = ckpt.standard_name_format(atomicity="stash").find_all(tmp_path)
    assert sorted(m.step for m in found) == [1, 2]
    assert ckpt.is_path_temporary(live.get(), atomicity="stash")
    # cleanup (under any configured strategy) removes only the uncommitted stash directory
    for atomicity in ("rename", "stash"):
        assert [str(t.get()) for t in ckpt.all_temporary_paths(tmp_path, atomicity=atomicity)] == [
            str(live.get())
        ]
    assert [str(p) for p in ckpt.cleanup_temporary_paths(tmp_path)] == [str(live.get())]
    assert len(stash_dirs(tmp_path)) == 2
    assert ckpt.Checkpointer("rename").restore(tmp_path / "2")["step"] == 2


def test_unreadable_marker_keeps_its_data(tmp_path: Path) -> None:
    ckpt.Checkpointer("stash").save(tmp_path / "1", tree(1))
    (tmp_path / "1" / COMMIT_SUCCESS_FILE).write_bytes(b"")
    assert ckpt.cleanup_temporary_paths(tmp_path, atomicity="stash") == []
    assert len(stash_dirs(tmp_path)) == 1


def test_partial_save(tmp_path: Path) -> None:
    ckpt.partial.save(tmp_path / "5", {"a": np.arange(3)}, atomicity="stash")
    ckpt.partial.save(tmp_path / "5", {"b": np.ones(2)}, atomicity="stash")
    ckpt.partial.finalize(tmp_path / "5", atomicity="stash")
    restored = ckpt.Checkpointer("stash").restore(tmp_path / "5")
    np.testing.assert_array_equal(restored["a"], np.arange(3))
    np.testing.assert_array_equal(restored["b"], np.ones(2))
    assert not ckpt.partial.partial_save_path(tmp_path / "5").exists()
    assert ckpt.all_temporary_paths(tmp_path, atomicity="stash") == []


def test_manager_with_retention(tmp_path: Path) -> None:
    with ckpt.CheckpointManager(tmp_path, max_to_keep=2, atomicity="stash") as mngr:
        for step in range(4):
            mngr.save(step, tree(step))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 3]
        assert mngr.restore()["step"] == 3
    assert sorted(n for n in os.listdir(tmp_path) if n != STASH) == ["2", "3"]
    assert len(stash_dirs(tmp_path)) == 2
    with ckpt.CheckpointManager(tmp_path, atomicity="stash") as mngr:
        assert mngr.all_steps() == [2, 3]
        mngr.delete(2)
        assert mngr.all_steps() == [3]
    assert len(stash_dirs(tmp_path)) == 1


def test_cli_ls_and_gc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt.Checkpointer("stash").save(tmp_path / "1", tree(1))
    live = StashTemporaryPath.from_final(tmp_path / "2")
    _sync.run(live.create())
    runner = CliRunner()
    out = runner.invoke(app, ["ls", str(tmp_path), "--atomicity", "stash"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "finalized" in out.output and "temporary" in out.output
    assert f"{STASH}/{live.get().name}" in out.output
    assert f"{STASH} " not in out.output  # the layout's own directory is not a checkpoint
    monkeypatch.setenv("CKPT_ATOMICITY", "stash")
    out = runner.invoke(app, ["gc", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "removed 1 temporary" in out.output
    assert not live.get().exists()
    assert ckpt.checkpoint_steps(tmp_path, atomicity="stash") == [1]


_KILL = """
import os, signal, sys
import numpy as np
import ckpt
sys.path.insert(0, sys.argv[3])
import test_third_party_strategy as t
backend = ckpt.get_backend(sys.argv[1])
op, _, name = "{op}".partition(":")
real = getattr(type(backend), op)
async def die(self, path, *args, **kwargs):
    if name in ("", path.name):
        os.kill(os.getpid(), signal.SIGKILL)
    return await real(self, path, *args, **kwargs)
setattr(type(backend), op, die)
ckpt.Checkpointer("stash").save(sys.argv[1] + "/" + sys.argv[2], t.tree(2), force=True)
"""


@pytest.mark.parametrize(
    "op", ["sync_tree", f"write_bytes:{COMMIT_SUCCESS_FILE}", "remove_tree"]
)
def test_sigkill_during_a_forced_save_keeps_one_committed(tmp_path: Path, op: str) -> None:
    ckpt.Checkpointer("stash").save(tmp_path / "1", tree(1))
    code = _KILL.replace("{op}", op)
    here = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), "1", here])
    assert proc.returncode == -9
    assert ckpt.checkpoint_steps(tmp_path, atomicity="stash") == [1]
    ckpt.cleanup_temporary_paths(tmp_path, atomicity="stash")
    assert ckpt.Checkpointer("stash").restore(tmp_path / "1")["step"] in (1, 2)
    assert len(stash_dirs(tmp_path)) == 1


# -- the core names no strategy, and imports without cycles ------------------------------------

CORE = Path(ckpt.__file__).parent


def _strings(tree_: ast.AST) -> list[str]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree_)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree_)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_no_core_module_names_a_strategy() -> None:
    names = set(ckpt.list_strategies())
    assert {"rename", "commit_file", "stash"} <= names
    layout_names = {".ckpt-writers", ".ckpt-writer-", STASH, ".ckpt-replaced-"}
    for path in sorted(CORE.rglob("*.py")):
        source = path.read_text()
        tree_ = ast.parse(source)
        for text in _strings(tree_):
            assert text not in names, f"{path.name} names strategy {text!r}"
            for layout in layout_names:
                assert layout not in text, f"{path.name} knows a strategy's layout: {text!r}"
        for node in ast.walk(tree_):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = getattr(node, "module", None) or ""
                imported = [module, *(a.name for a in node.names)]
                assert not any(m.startswith("ckpt_strategies") for m in imported), path.name


def _edges() -> dict[str, set[str]]:
    modules = {f"ckpt.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for path in CORE.glob("*.py"):
        if path.stem == "__init__":
            continue
        name = f"ckpt.{path.stem}"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):  # also imports inside functions
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module in modules:
                    deps.add(node.module)
                elif node.module == "ckpt":
                    deps |= {f"ckpt.{a.name}" for a in node.names} & modules
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & modules
        graph[name] = deps - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep, [*stack, dep])):
                return found
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return None


def test_core_has_no_import_cycles() -> None:
    graph = _edges()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    # not vacuous: the registry/protocol cycle this layout replaced would be found
    graph["ckpt.strategy"] = {*graph["ckpt.strategy"], "ckpt.registry"}
    assert _cycle(graph) is not None
