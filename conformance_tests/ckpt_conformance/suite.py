"""The conformance tests (see the package docstring for how to use them)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import fsspec
import pytest

import ckpt
from ckpt import _sync
from ckpt.layout import COMMIT_SUCCESS_FILE, METADATA_FILE
from ckpt.registry import resolve, supported_strategies
from ckpt_conformance.faults import FaultConformance, RaceConformance, fault_parameters
from ckpt_conformance.instrumented import InstrumentedBackend
from ckpt_conformance.integrity import IntegrityConformance


def strategy_names() -> list[str]:
    """Every registered strategy (built-in and third-party), by name: the ``strategy``
    fixture runs each one the backend under test has the capabilities for."""
    return list(ckpt.list_strategies())


def shipped_strategy_names() -> list[str]:
    """The strategies of installed plugins: ckpt's built-ins and those of pip-installed
    distributions (entry points), without strategies registered at run time (e.g. by
    another test module through ``ckpt.plugins.manager.register``)."""
    import importlib.metadata

    from ckpt import plugins

    registered = strategy_names()  # loads the plugins
    installed = set(plugins.DEFAULT_PLUGINS) | {
        ep.name for ep in importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)
    }
    names: list[str] = []
    for impl in plugins.manager.pm.hook.register_strategies.get_hookimpls():
        if impl.plugin_name in installed:
            impl.function(lambda name, cls: names.append(name))
    return [n for n in registered if n in names]


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


class BackendConformance(IntegrityConformance, FaultConformance, RaceConformance):
    """Base class of the suite. Subclasses provide the ``ckpt_root`` fixture."""

    #: The strategies to run, by name: None for every registered one
    #: (:func:`strategy_names`); a backend's test module may narrow it, e.g. to
    #: :func:`shipped_strategy_names` to leave a test-only strategy to another backend's run.
    strategies: list[str] | None = None

    def _strategies(self) -> list[str]:
        return strategy_names() if self.strategies is None else list(self.strategies)

    # -- fixtures a backend provides or overrides -----------------------------------------
    @pytest.fixture
    def ckpt_root(self) -> str:
        raise NotImplementedError("Provide a `ckpt_root` fixture returning a fresh root URL.")

    @pytest.fixture
    def ckpt_storage_options(self) -> dict[str, Any]:
        """fsspec storage options for out-of-band access to the store."""
        return {}

    # -- fixtures of the suite ----------------------------------------------------------------
    @pytest.fixture
    def root(self, ckpt_root: str) -> str:
        return str(ckpt_root).rstrip("/")

    @pytest.fixture
    def backend(self, root: str) -> ckpt.Backend:
        return ckpt.get_backend(root)

    @pytest.fixture
    def raw(self, root: str, ckpt_storage_options: dict[str, Any]) -> _Raw:
        fs, _ = fsspec.core.url_to_fs(root, **ckpt_storage_options)
        return _Raw(fs)

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize ``strategy`` with the strategies registered at collection time."""
        if "strategy" in metafunc.fixturenames and "op" in metafunc.fixturenames:
            pairs = fault_parameters(self._strategies())
            metafunc.parametrize(("strategy", "op"), pairs, indirect=["strategy"])
        elif "strategy" in metafunc.fixturenames:
            metafunc.parametrize("strategy", self._strategies(), indirect=True)

    @pytest.fixture
    def strategy(self, request: pytest.FixtureRequest, backend: ckpt.Backend, root: str) -> str:
        name: str = request.param
        cls = ckpt.get_strategy(name)
        missing = [
            c
            for c in cls.requires
            if not backend.bind(ckpt.registry.to_path(root)).capabilities.has(c)
        ]
        if missing:
            pytest.skip(
                f"{backend.describe()} lacks {', '.join(missing)}: strategy {name!r} does not apply"
            )
        return name

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def save(root: str, name: str, strategy: str, files: dict[str, bytes] | None = None) -> Any:
        """Create and commit one checkpoint named ``name`` with ``files`` in it."""
        tmp = ckpt.get_strategy(strategy).from_final(_join(root, name))
        _sync.run(tmp.create())
        for rel, data in (files or {"data.bin": b"payload"}).items():
            _sync.run(tmp.backend.write_bytes(tmp.get() / rel, data))
        _sync.run(tmp.finalize())
        return tmp

    @staticmethod
    def started(root: str, name: str, strategy: str) -> Any:
        tmp = ckpt.get_strategy(strategy).from_final(_join(root, name))
        _sync.run(tmp.create())
        _sync.run(tmp.backend.write_bytes(tmp.get() / "data.bin", b"partial"))
        return tmp

    # -- capabilities -------------------------------------------------------------------------
    def test_backend_declares_capabilities_and_a_usable_default(
        self, backend: ckpt.Backend, root: str
    ) -> None:
        works = supported_strategies(backend.bind(ckpt.registry.to_path(root)))
        assert works, f"{backend!r} supports no registered strategy"
        resolution = resolve(root, "auto")
        assert resolution.name in works

    # -- primitives ---------------------------------------------------------------------------
    def test_write_read_list_remove(self, backend: ckpt.Backend, root: str, raw: _Raw) -> None:
        base = ckpt.registry.to_path(root)
        b = backend.bind(base)
        _sync.run(b.mkdir(base / "d", parents=True))
        _sync.run(b.write_bytes(base / "d" / "f one ü.txt", b"hello"))
        _sync.run(b.write_bytes(base / "d" / "sub" / "g.txt", b"x"))
        assert raw.cat(_join(root, "d", "f one ü.txt")) == b"hello"  # out of band
        assert _sync.run(b.read_bytes(base / "d" / "f one ü.txt")) == b"hello"
        entries = {e.name: e.is_dir for e in _sync.run(b.list_dir(base / "d"))}
        assert entries == {"f one ü.txt": False, "sub": True}
        assert _sync.run(b.exists(base / "d" / "sub"))
        assert _sync.run(b.is_dir(base / "d" / "sub"))
        assert not _sync.run(b.is_dir(base / "d" / "f one ü.txt"))
        assert _sync.run(b.list_dir(base / "missing")) == []
        _sync.run(b.remove_file(base / "d" / "nope"))  # missing is fine
        with pytest.raises(FileNotFoundError):
            _sync.run(b.read_bytes(base / "d" / "nope"))
        _sync.run(b.remove_tree(base / "d"))
        assert not raw.exists(_join(root, "d", "f one ü.txt"))
        assert not _sync.run(b.exists(base / "d"))

    def test_write_buffers(self, backend: ckpt.Backend, root: str, raw: _Raw) -> None:
        """``write_buffers`` writes its buffers back to back (bytes, memoryviews, uint8
        arrays, empty ones, more than IOV_MAX of them) and replaces an existing file."""
        import numpy as np

        base = ckpt.registry.to_path(root)
        b = backend.bind(base)
        big = np.arange(3 << 20, dtype=np.uint32).view(np.uint8)  # 12 MiB
        buffers: list[Any] = [b"head", b"", memoryview(b"mid"), big, np.zeros(0, np.uint8)]
        buffers += [bytes([i % 256]) for i in range(1500)]  # more buffers than IOV_MAX
        want = b"".join(memoryview(x).cast("B") for x in buffers)
        _sync.run(b.write_buffers(base / "w" / "packed", buffers))
        assert raw.cat(_join(root, "w", "packed")) == want  # out of band
        _sync.run(b.write_bytes(base / "w" / "short", b"old contents, longer than the new"))
        _sync.run(b.write_buffers(base / "w" / "short", [b"ab", np.frombuffer(b"c", np.uint8)]))
        assert raw.cat(_join(root, "w", "short")) == b"abc"
        _sync.run(b.write_buffers(base / "w" / "empty", []))
        assert raw.cat(_join(root, "w", "empty")) == b""

    def test_conditional_create(self, backend: ckpt.Backend, root: str, raw: _Raw) -> None:
        base = ckpt.registry.to_path(root)
        b = backend.bind(base)
        if not b.capabilities.conditional_put:
            pytest.skip(f"{b.describe()} has no conditional_put")
        _sync.run(b.mkdir(base, parents=True))
        _sync.run(b.create_exclusive(base / "marker", b"first"))
        with pytest.raises(FileExistsError):
            _sync.run(b.create_exclusive(base / "marker", b"second"))
        assert raw.cat(_join(root, "marker")) == b"first"

    def test_racing_conditional_creates_have_one_winner(
        self, backend: ckpt.Backend, root: str, raw: _Raw
    ) -> None:
        base = ckpt.registry.to_path(root)
        b = backend.bind(base)
        if not b.capabilities.conditional_put:
            pytest.skip(f"{b.describe()} has no conditional_put")
        _sync.run(b.mkdir(base, parents=True))

        async def race() -> list[bool]:
            async def one(i: int) -> bool:
                try:
                    await b.create_exclusive(base / "race", str(i).encode())
                    return True
                except FileExistsError:
                    return False

            return list(await asyncio.gather(*(one(i) for i in range(8))))

        results = _sync.run(race())
        assert results.count(True) == 1
        assert raw.cat(_join(root, "race")) == str(results.index(True)).encode()

    # -- strategies: create / finalize / validate -----------------------------------------------
    def test_create_finalize_validate(self, strategy: str, root: str, raw: _Raw) -> None:
        cls = ckpt.get_strategy(strategy)
        tmp = cls.from_final(_join(root, "7"))
        assert str(tmp.get_final()) == _join(root, "7")
        assert tmp.get() != tmp.get_final()
        _sync.run(tmp.create())
        _sync.run(tmp.backend.write_bytes(tmp.get() / "data.bin", b"abc"))
        _sync.run(cls.validate(tmp.get()))
        with pytest.raises(ckpt.ValidationError):
            _sync.run(cls.validate_final(tmp.get_final()))
        assert ckpt.is_path_temporary(tmp.get())
        assert not ckpt.is_path_finalized(_join(root, "7"), atomicity=strategy)
        assert ckpt.checkpoint_steps(root, atomicity=strategy) == []
        _sync.run(tmp.finalize())
        _sync.run(cls.validate_final(tmp.get_final()))
        assert ckpt.is_path_finalized(_join(root, "7"), atomicity=strategy)
        assert not ckpt.is_path_temporary(_join(root, "7"))
        assert ckpt.checkpoint_steps(root, atomicity=strategy) == [7]
        # Out of band: the marker is there, the metadata has both timestamps.
        assert raw.exists(_join(root, "7", COMMIT_SUCCESS_FILE))
        content = _sync.run(ckpt.content_path(tmp.backend, tmp.get_final()))
        assert raw.cat(str(content / "data.bin")) == b"abc"
        meta = json.loads(raw.cat(str(content / METADATA_FILE)))
        assert meta["init_timestamp_nsecs"] <= meta["commit_timestamp_nsecs"]
        assert ckpt.all_temporary_paths(root) == []

    def test_from_temporary_round_trips(self, strategy: str, root: str) -> None:
        cls = ckpt.get_strategy(strategy)
        tmp = cls.from_final(_join(root, "step_3"))
        again = cls.from_temporary(tmp.get())
        assert str(again.get_final()) == str(tmp.get_final())
        assert str(again.get()) == str(tmp.get())

    def test_cross_strategy_reads(self, strategy: str, root: str, backend: ckpt.Backend) -> None:
        self.save(root, "11", strategy)
        for reader in supported_strategies(backend.bind(ckpt.registry.to_path(root))):
            assert ckpt.checkpoint_steps(root, atomicity=reader) == [11], reader
            assert [m.step for m in ckpt.standard_name_format(atomicity=reader).find_all(root)] == [
                11
            ]

    def test_two_writers_one_winner(self, strategy: str, root: str, raw: _Raw) -> None:
        a = self.started(root, "5", strategy)
        b = self.started(root, "5", strategy)
        assert str(a.get()) != str(b.get()), "temporary names must be unique per writer"
        _sync.run(a.backend.write_bytes(a.get() / "who", b"a"))
        _sync.run(b.backend.write_bytes(b.get() / "who", b"b"))
        _sync.run(a.finalize())
        with pytest.raises(ckpt.CommitConflictError):
            _sync.run(b.finalize())
        content = _sync.run(ckpt.content_path(a.backend, a.get_final()))
        assert raw.cat(str(content / "who")) == b"a"
        assert not raw.exists(str(b.get() / "who"))
        assert ckpt.checkpoint_steps(root, atomicity=strategy) == [5]

    def test_writer_never_touches_another_writers_live_temp(self, strategy: str, root: str) -> None:
        a = self.started(root, "6", strategy)
        b = self.started(root, "6", strategy)
        assert _sync.run(a.backend.exists(a.get() / "data.bin"))
        assert _sync.run(b.backend.exists(b.get() / "data.bin"))
        _sync.run(b.finalize())
        assert _sync.run(a.backend.exists(a.get() / "data.bin"))

    # -- discovery and name formats -------------------------------------------------------------
    def test_discovery_with_name_formats(self, strategy: str, root: str) -> None:
        for name in ("step_0001", "step_0002", "step_0010", "other_3", "4"):
            self.save(root, name, strategy)
        self.started(root, "step_0011", strategy)
        fmt = ckpt.standard_name_format("step", 4, atomicity=strategy)
        assert sorted(m.step for m in fmt.find_all(root)) == [1, 2, 10]
        assert fmt.find_step(root, 2).path.name == "step_0002"
        with pytest.raises(ValueError):
            fmt.find_step(root, 11)  # uncommitted
        with pytest.raises(ValueError):
            fmt.find_step(root, 99)
        path = ckpt.find_step_path(root, fmt, step=11, include_uncommitted=True)
        assert ckpt.is_path_temporary(path)
        latest = ckpt.latest_step_metadata(root, fmt)
        assert latest is not None and latest.step == 10
        plain = ckpt.standard_name_format(atomicity=strategy)
        assert [m.step for m in plain.find_all(root)] == [4]
        composite = ckpt.composite_name_format(fmt, [fmt, plain])
        assert sorted(m.step for m in composite.find_all(root)) == [1, 2, 4, 10]
        assert ckpt.checkpoint_steps(root, atomicity=strategy) == [1, 2, 3, 4, 10]

    def test_odd_names(self, strategy: str, root: str) -> None:
        fmt = ckpt.standard_name_format("run ü 1", atomicity=strategy)
        self.save(root, fmt.build_name(12), strategy, {"file with space ✓": b"z"})
        found = list(fmt.find_all(root))
        assert [m.step for m in found] == [12]
        content = _sync.run(ckpt.content_path(ckpt.get_backend(root), found[0].path))
        assert _sync.run(ckpt.get_backend(root).read_bytes(content / "file with space ✓")) == b"z"

    def test_pagination(self, strategy: str, root: str, raw: _Raw) -> None:
        n = 1100
        # Out of band: n committed checkpoints (marker inside), as another tool would leave.
        raw.put_many({_join(root, str(i), COMMIT_SUCCESS_FILE): b"ok" for i in range(n)})
        steps = ckpt.checkpoint_steps(root, atomicity=strategy)
        assert steps == list(range(n))
        assert len(list(ckpt.standard_name_format(atomicity=strategy).find_all(root))) == n

    # -- cleanup --------------------------------------------------------------------------------
    def test_cleanup_removes_only_temporaries(self, strategy: str, root: str, raw: _Raw) -> None:
        self.save(root, "1", strategy)
        live = self.started(root, "2", strategy)
        # Unknown: neither commit nor temporary evidence (e.g. copied without its marker).
        raw.put_many({_join(root, "3", "data.bin"): b"precious"})
        removed = ckpt.cleanup_temporary_paths(root, atomicity=strategy)
        assert [str(p) for p in removed] == [str(live.get())]
        assert not raw.exists(str(live.get() / "data.bin"))
        assert raw.cat(_join(root, "3", "data.bin")) == b"precious"
        state = ckpt.path_state(_join(root, "3"), atomicity=strategy)
        if ckpt.get_strategy(strategy).names_are_commit_evidence:
            # A name without temporary evidence is itself the commit evidence (rename).
            assert state == ckpt.PathState.FINALIZED
        else:
            assert state == ckpt.PathState.UNKNOWN
            assert not ckpt.is_path_finalized(_join(root, "3"), atomicity=strategy)
        assert not ckpt.is_path_temporary(_join(root, "3"))
        assert ckpt.is_path_finalized(_join(root, "1"), atomicity=strategy)
        assert ckpt.cleanup_temporary_paths(root, atomicity=strategy) == []
        assert raw.cat(_join(root, "3", "data.bin")) == b"precious"

    def test_cleanup_removes_orbax_style_temporaries(self, root: str, raw: _Raw) -> None:
        for name in ("8.orbax-checkpoint-tmp", "9.orbax-checkpoint-tmp-1234567"):
            raw.put_many({_join(root, name, "data.bin"): b"x"})
        assert len(ckpt.all_temporary_paths(root)) == 2
        ckpt.cleanup_temporary_paths(root)
        assert not raw.exists(_join(root, "8.orbax-checkpoint-tmp", "data.bin"))
        assert not raw.exists(_join(root, "9.orbax-checkpoint-tmp-1234567", "data.bin"))

    def test_delete_checkpoint_uncommits_first(self, strategy: str, root: str, raw: _Raw) -> None:
        tmp = self.save(root, "4", strategy)
        _sync.run(ckpt.delete_checkpoint(tmp.backend, tmp.get_final()))
        assert ckpt.checkpoint_steps(root, atomicity=strategy) == []
        assert not raw.exists(_join(root, "4", COMMIT_SUCCESS_FILE))
        assert ckpt.all_temporary_paths(root) == []

    # -- arrays: the tree format through the backend's kvstore_spec ------------------------------
    def test_arrays_round_trip_through_kvstore_spec(
        self, strategy: str, root: str, raw: _Raw
    ) -> None:
        import numpy as np

        tree: dict[str, Any] = {
            "w": np.arange(3 * 1024, dtype=np.float32).reshape(96, 32),
            "b": np.ones(7, np.int8),
            "nested": {"empty": np.zeros((0, 4), np.float64), "step": 3},
        }
        ckptr = ckpt.Checkpointer(strategy)
        ckptr.save(_join(root, "3"), tree)
        restored = ckptr.restore(_join(root, "3"))
        for key in ("w", "b"):
            np.testing.assert_array_equal(restored[key], tree[key])
            assert restored[key].dtype == tree[key].dtype
        assert restored["nested"]["empty"].shape == (0, 4)
        assert restored["nested"]["step"] == 3
        content = _sync.run(
            ckpt.content_path(
                ckpt.get_backend(root), ckpt.registry.to_path(_join(root, "3")), atomicity=strategy
            )
        )
        assert raw.exists(str(content / "_TREE.json"))  # out of band: written to the store
        assert ckpt.all_temporary_paths(root, atomicity=strategy) == []

    # -- forced replace: exactly one of old or new stays committed ---------------------------------
    def test_forced_replace_fails_at_any_call_keeps_one_committed(
        self, strategy: str, root: str, backend: ckpt.Backend
    ) -> None:
        inner = backend.bind(ckpt.registry.to_path(root))
        counting = _FailNth(inner, 0)
        ckpt.Checkpointer(strategy).save(_join(root, "0"), {"v": 1})
        ckpt.Checkpointer(strategy, backend=counting).save(_join(root, "0"), {"v": 2}, force=True)
        assert ckpt.Checkpointer(strategy).restore(_join(root, "0")) == {"v": 2}
        assert counting.calls > 0, "no storage call after the tree was written?"
        for n in range(1, counting.calls + 1):
            final = _join(root, str(n))
            ckpt.Checkpointer(strategy).save(final, {"v": 1})
            failing = _FailNth(inner, n)
            try:
                ckpt.Checkpointer(strategy, backend=failing).save(final, {"v": 2}, force=True)
                outcome = {2}
            except ckpt.CommitNotDurableError:
                outcome = {2}
            except OSError:
                outcome = {1, 2}
            got = ckpt.Checkpointer(strategy).restore(final)["v"]
            assert got in outcome, f"call {n} ({failing.failed}): restored {got}"
            ckpt.cleanup_temporary_paths(root, atomicity=strategy)
            assert ckpt.Checkpointer(strategy).restore(final)["v"] == got, f"call {n}"
            assert ckpt.all_temporary_paths(root, atomicity=strategy) == []
        steps = ckpt.checkpoint_steps(root, atomicity=strategy)
        assert steps == list(range(counting.calls + 1))

    # -- copy primitive and snapshots --------------------------------------------------------------
    def test_copy_tree_every_method(self, root: str, backend: ckpt.Backend, raw: _Raw) -> None:
        b = backend.bind(ckpt.registry.to_path(root))
        files = {"a.bin": os.urandom(3000), "sub/b.bin": b"b" * 10, "sub/deeper/c": b""}
        src = ckpt.registry.to_path(_join(root, "src"))
        for rel, data in files.items():
            _sync.run(b.write_bytes(src / rel, data))
        methods = b.copy_methods()
        assert methods[-1] == "read_write"
        for method in methods:
            dst = ckpt.registry.to_path(_join(root, f"dst-{method}"))
            used = _sync.run(b.copy_tree(src, dst, method=method))
            assert used in methods[methods.index(method) :], (method, used)
            for rel, data in files.items():
                assert raw.cat(_join(root, f"dst-{method}", rel)) == data, (method, rel)
            assert _sync.run(b.file_sizes(dst)) == {k: len(v) for k, v in files.items()}
        with pytest.raises(ValueError, match="available"):
            _sync.run(b.copy_tree(src, ckpt.registry.to_path(_join(root, "x")), method="nope"))

    @staticmethod
    def _snapshot_or_skip(backend: ckpt.Backend, root: str) -> Any:
        b = backend.bind(ckpt.registry.to_path(root))
        if "snapshot" not in supported_strategies(b):
            pytest.skip(f"{b.describe()} cannot run the snapshot strategy")
        return ckpt.get_strategy("snapshot")

    def test_snapshot_in_place_and_empty(self, root: str, backend: ckpt.Backend) -> None:
        cls = self._snapshot_or_skip(backend, root)
        final = _join(root, "1")
        ckpt.Checkpointer("snapshot").save(final, {"v": 1})
        tmp = cls.from_final(final, snapshot_type="in_place")
        where = _sync.run(tmp.create())
        _sync.run(tmp.backend.write_bytes(where / "added.bin", b"added"))
        _sync.run(tmp.finalize())
        assert ckpt.Checkpointer("snapshot").restore(final) == {"v": 1}  # manifest checked
        b = tmp.backend
        assert _sync.run(b.read_bytes(ckpt.registry.to_path(final) / "added.bin")) == b"added"
        assert ckpt.checkpoint_steps(root, atomicity="snapshot") == [1]
        pending = cls.from_final(final, snapshot_type="empty")
        _sync.run(b.write_bytes(_sync.run(pending.create()) / "p.bin", b"p"))
        _sync.run(pending.finalize())
        assert _sync.run(b.read_bytes(pending.published / "p.bin")) == b"p"
        assert ckpt.all_temporary_paths(root, atomicity="snapshot") == []

    @staticmethod
    def _snapshot_version(backend: ckpt.Backend, final: str) -> str:
        """Old or new: the checkpoint restores (files checked against its manifest) and the
        new one is the old plus ``new.bin``."""
        assert ckpt.Checkpointer("snapshot").restore(final) == {"v": 1}
        new_file = ckpt.registry.to_path(final) / "new.bin"
        return "new" if _sync.run(backend.exists(new_file)) else "old"

    def test_snapshot_fails_at_any_call_keeps_one_committed(
        self, root: str, backend: ckpt.Backend
    ) -> None:
        cls = self._snapshot_or_skip(backend, root)
        inner = backend.bind(ckpt.registry.to_path(root))

        def change(final: str, failing: _FailNth) -> None:
            tmp = cls.from_final(final, backend=failing, snapshot_type="in_place")
            where = _sync.run(tmp.create())
            _sync.run(inner.write_bytes(where / "new.bin", b"new"))
            failing.armed = True
            _sync.run(tmp.finalize())

        counting = _FailNth(inner, 0)
        ckpt.Checkpointer("snapshot").save(_join(root, "0"), {"v": 1})
        change(_join(root, "0"), counting)
        assert counting.calls > 0
        for n in range(1, counting.calls + 1):
            final = _join(root, str(n))
            ckpt.Checkpointer("snapshot").save(final, {"v": 1})
            failing = _FailNth(inner, n)
            try:
                change(final, failing)
                outcome = {"new"}
            except ckpt.CommitNotDurableError:
                outcome = {"new"}
            except OSError:
                outcome = {"old", "new"}
            got = self._snapshot_version(inner, final)
            assert got in outcome, f"call {n} ({failing.failed}): {got}"
            ckpt.cleanup_temporary_paths(root, atomicity="snapshot")
            assert self._snapshot_version(inner, final) == got, f"call {n}"
            assert ckpt.all_temporary_paths(root, atomicity="snapshot") == []
        steps = ckpt.checkpoint_steps(root, atomicity="snapshot")
        assert steps == list(range(counting.calls + 1))

    # -- symlinks --------------------------------------------------------------------------------
    def test_symlinks_are_never_temporary(self, root: str, backend: ckpt.Backend) -> None:
        b = backend.bind(ckpt.registry.to_path(root))
        if not b.capabilities.symlinks:
            pytest.skip(f"{b.describe()} has no symlinks")
        target = ckpt.registry.to_path(root) / "real"
        _sync.run(b.mkdir(target, parents=True))
        _sync.run(b.write_bytes(target / "data.bin", b"keep"))
        link = str(ckpt.registry.to_path(root) / "1.orbax-checkpoint-tmp")
        os.symlink(target.path, ckpt.registry.to_path(link).path)
        assert not ckpt.is_path_temporary(link)
        assert ckpt.all_temporary_paths(root) == []
        ckpt.cleanup_temporary_paths(root)
        assert os.path.islink(ckpt.registry.to_path(link).path)
        assert _sync.run(b.read_bytes(target / "data.bin")) == b"keep"
        for name in ckpt.list_strategies():
            cls = ckpt.get_strategy(name)
            with pytest.raises(ckpt.ValidationError):
                _sync.run(cls.validate(link))

    # -- clear errors ----------------------------------------------------------------------------
    def test_unknown_strategy_is_a_clear_error(self, root: str) -> None:
        with pytest.raises(ckpt.UnknownStrategyError, match="commit_file"):
            ckpt.strategy_for(root, "no_such_strategy")

    def test_unsupported_strategy_names_what_works(self, root: str, backend: ckpt.Backend) -> None:
        b = backend.bind(ckpt.registry.to_path(root))
        works = supported_strategies(b)
        unsupported = [n for n in ckpt.list_strategies() if n not in works]
        if not unsupported:
            pytest.skip(f"{b.describe()} supports every registered strategy")
        for name in unsupported:
            with pytest.raises(ckpt.UnsupportedStrategyError) as info:
                ckpt.strategy_for(root, name)
            for good in works:
                assert good in str(info.value)

    def test_names_that_escape_are_refused(self, root: str, raw: _Raw) -> None:
        for prefix in ("..", "a/b", "../up", ""):
            with pytest.raises(ValueError):
                ckpt.standard_name_format(prefix)
        with pytest.raises(ValueError):
            ckpt.get_save_directory(1, root, name="../escape")
        assert not raw.exists(_join(root.rstrip("/").rsplit("/", 1)[0], "escape"))

    def test_read_only_temporary_path_is_json(self, strategy: str, root: str) -> None:
        tmp = ckpt.get_strategy(strategy).from_final(_join(root, "1"))
        ro = ckpt.ReadOnlyTemporaryPath.from_paths(
            temporary_path=tmp.get(), final_path=tmp.get_final()
        )
        data = ro.to_bytes()
        assert json.loads(data)["final_path"] == _join(root, "1")
        back = ckpt.ReadOnlyTemporaryPath.from_bytes(data)
        assert str(back.get()) == str(tmp.get()) and str(back.get_final()) == str(tmp.get_final())


class _FailNth(InstrumentedBackend):
    """Fails the ``n``-th storage call made after the tree file is written (the commit),
    once, with ``OSError(5)``; counts those calls in :attr:`calls`."""

    def __init__(self, inner: ckpt.Backend, n: int) -> None:
        super().__init__(inner)
        self.n = n
        self.calls = 0
        self.armed = False
        self.failed = ""

    async def hook(self, op: str, path: Any) -> None:
        await super().hook(op, path)
        if self.armed:
            self.calls += 1
            if self.calls == self.n:
                self.failed = f"{op}:{path.name}"
                raise OSError(5, "injected I/O error", str(path))
        if op == "write_bytes" and path.name == "_TREE.json":
            self.armed = True


class _Raw:
    """Out-of-band access to the store with plain fsspec."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs

    def _p(self, url: str) -> str:
        return self.fs._strip_protocol(url)

    def cat(self, url: str) -> bytes:
        return self.fs.cat_file(self._p(url))

    def exists(self, url: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self._p(url))

    def put_many(self, files: dict[str, bytes]) -> None:
        paths = {self._p(k): v for k, v in files.items()}
        if self.fs.protocol in ("file", "local") or "file" in self.fs.protocol:
            for path in paths:
                os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fs.pipe(paths)
        self.fs.invalidate_cache()


__all__ = ["BackendConformance"]
