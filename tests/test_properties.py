"""Property tests (hypothesis).

- ``NameFormat``: names built from steps parse back to the same step, every name parses to
  at most one step, and parsing arbitrary names never crashes.
- A stateful test: random sequences of saves, crashes (a storage primitive fails mid-save,
  optionally leaving its temporary behind), asynchronous saves held before their commit and
  then finalized or crashed, deletes, cleanups, manager restarts and retention, against a
  model of which steps must be visible. Real local filesystem, both strategies.

Sizes are kept small (the whole module runs in well under a minute on 2 cores); raise
``CKPT_HYPOTHESIS_EXAMPLES`` to search longer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

import ckpt
from ckpt.layout import TMP_DIR_SUFFIX, is_temporary_name
from ckpt.step import step_from_checkpoint_name
from ckpt_backend_local import LocalBackend
from ckpt_conformance.instrumented import InstrumentedBackend
from ckpt_strategies.commit_file import WRITER_DIR_INFIX, is_writer_dir_name

EXAMPLES = int(os.environ.get("CKPT_HYPOTHESIS_EXAMPLES", "0")) or None

# -- NameFormat ------------------------------------------------------------------------------

prefixes = st.one_of(
    st.none(),
    st.text(
        st.characters(codec="utf-8", exclude_characters="/\\\x00"), min_size=1, max_size=12
    ),
)
lengths = st.one_of(st.none(), st.integers(min_value=0, max_value=12))
steps = st.integers(min_value=0, max_value=10**15)


def _format(prefix: str | None, length: int | None) -> Any:
    try:
        return ckpt.standard_name_format(prefix, length)
    except ckpt.UnsafePathError:
        assume(False)  # refused with a clear error: nothing more to check
        raise


@settings(max_examples=EXAMPLES or 300, deadline=None)
@given(prefixes, lengths, steps)
def test_build_then_parse_round_trips(prefix: str | None, length: int | None, step: int) -> None:
    fmt = _format(prefix, length)
    name = fmt.build_name(step)
    assert fmt.parse(name) == step
    assert ckpt.layout.check_safe_name(name) == name
    assert not is_temporary_name(name) and not is_writer_dir_name(name)
    if prefix is None or not prefix.endswith(tuple("0123456789")):
        assert step_from_checkpoint_name(name) == step
    if length:
        assert len(name) >= len(ckpt.step.step_prefix_with_underscore(prefix)) + length


@settings(max_examples=EXAMPLES or 300, deadline=None)
@given(prefixes, lengths, st.text(max_size=30) | st.from_regex(r"[a-z_]{0,4}[0-9]{1,8}"))
def test_parse_never_crashes_and_is_one_to_one(
    prefix: str | None, length: int | None, name: str
) -> None:
    """Any name parses to None or to the one step whose built name it is (so two names on
    storage never claim the same step)."""
    fmt = _format(prefix, length)
    step = fmt.parse(name)
    if step is not None:
        assert fmt.build_name(step) == name


@settings(max_examples=EXAMPLES or 300, deadline=None)
@given(st.text(max_size=30) | st.from_regex(r"[^_]{0,5}_?[0-9]{0,5}(\.orbax-checkpoint-tmp.*)?"))
def test_step_from_checkpoint_name_never_crashes(name: str) -> None:
    try:
        step = step_from_checkpoint_name(name)
    except ValueError as exc:
        assert repr(name) in str(exc)
        return
    assert isinstance(step, int) and step >= 0
    assert str(step) in name.lstrip("0") or step == 0


@pytest.mark.parametrize("digit", ["\u0663", "\u00b2", "\uff13", "\u2463"])
def test_non_ascii_digits_are_not_steps(tmp_path: Path, digit: str) -> None:
    """Arabic-Indic three, superscript two, fullwidth three: not steps, and no crash when such a
    directory sits in the root."""
    fmt = ckpt.standard_name_format()
    assert fmt.parse(digit) is None and fmt.parse(f"1{digit}") is None
    with pytest.raises(ValueError):
        step_from_checkpoint_name(digit)
    (tmp_path / digit).mkdir()
    (tmp_path / f"x_{digit}").mkdir()
    ckpt.Checkpointer().save(tmp_path / "3", {"a": 1})
    assert ckpt.checkpoint_steps(tmp_path) == [3]
    assert [m.step for m in fmt.find_all(tmp_path)] == [3]


@pytest.mark.parametrize("prefix", [f"a{TMP_DIR_SUFFIX}", f"a{WRITER_DIR_INFIX}x", "..", "a/b"])
def test_prefixes_that_would_make_hidden_or_unsafe_names_are_refused(prefix: str) -> None:
    with pytest.raises(ckpt.UnsafePathError, match="prefix"):
        ckpt.standard_name_format(prefix)


def test_negative_step_is_refused() -> None:
    with pytest.raises(ValueError, match="-1"):
        ckpt.standard_name_format().build_name(-1)


# -- stateful: saves, crashes, finalization, deletes, cleanup, retention ------------------------

#: Primitives whose failure interrupts a save before its commit, per strategy (key of
#: :class:`InstrumentedBackend`; ``{name}`` is the step's directory name).
CRASH_POINTS = {
    "rename": [
        "write_bytes:_TREE.json",
        "write_bytes:_CHECKPOINT_METADATA",
        "sync_tree",
        "rename_dir:{name}",
    ],
    "commit_file": [
        "write_bytes:_TREE.json",
        "write_bytes:_CHECKPOINT_METADATA",
        "sync_tree",
        "mkdir:{name}",
        "create_exclusive:commit_success.txt",
    ],
}
#: The commit primitive, held by a gate to keep a save pending.
COMMIT_KEY = {"rename": "rename_dir:{name}", "commit_file": "create_exclusive:commit_success.txt"}
MAX_TO_KEEP = 3
STEP = st.integers(min_value=0, max_value=12)


def _tree(step: int) -> dict[str, Any]:
    return {"w": np.full(3, step, dtype=np.int32), "step": step}


class Injected(OSError):
    """The injected storage failure."""


class CheckpointModel(RuleBasedStateMachine):
    strategy = "rename"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="ckpt-stateful-")
        self.root = Path(self.tmp) / "root"
        # An empty config of its own: the same settings wherever pytest runs (and no
        # parsing of the repository's pyproject.toml on every call).
        config = Path(self.tmp) / "ckpt.toml"
        config.write_text("")
        self._saved_config = os.environ.get("CKPT_CONFIG")
        self._saved_atomicity = os.environ.pop("CKPT_ATOMICITY", None)
        os.environ["CKPT_CONFIG"] = str(config)
        self.backend = InstrumentedBackend(LocalBackend())
        #: The model: committed steps, temporaries left behind, the save held at its commit.
        self.committed: set[int] = set()
        self.leftovers = 0
        #: commit_file: steps whose final directory a crash at the marker left empty (one
        #: of the leftovers): a later commit of the step uses it, a failed one drops it.
        self.empty_finals: set[int] = set()
        self.pending: int | None = None
        self.manager = self._open()

    def _open(self) -> ckpt.CheckpointManager:
        manager = ckpt.CheckpointManager(
            self.root,
            atomicity=self.strategy,
            max_to_keep=MAX_TO_KEEP,
            backend=self.backend,
            async_save=True,
        )
        manager.wait_until_finished()  # its cleanup of older temporaries
        return manager

    def teardown(self) -> None:
        self.backend.release_all()
        try:
            self.manager.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self._saved_config is None:
                os.environ.pop("CKPT_CONFIG", None)
            else:
                os.environ["CKPT_CONFIG"] = self._saved_config
            if self._saved_atomicity is not None:
                os.environ["CKPT_ATOMICITY"] = self._saved_atomicity

    # -- helpers ------------------------------------------------------------------------
    def _expect_started(self, step: int) -> bool:
        """Whether the manager starts a save of ``step`` (else: refused or skipped)."""
        return step not in self.committed and (not self.committed or step > max(self.committed))

    def _empty_final_gone(self, step: int) -> None:
        if step in self.empty_finals:
            self.empty_finals.discard(step)
            self.leftovers -= 1

    def _retain(self, step: int) -> None:
        self._empty_final_gone(step)  # the empty step directory is the checkpoint now
        self.committed.add(step)
        self.committed = set(sorted(self.committed)[-MAX_TO_KEEP:])

    def _key(self, template: str, step: int) -> str:
        return template.format(name=str(step))

    # -- rules --------------------------------------------------------------------------
    def _next_step(self, data: st.DataObject) -> int:
        """A step the manager will start saving (above every committed one)."""
        low = max(self.committed) + 1 if self.committed else 0
        return data.draw(st.integers(min_value=low, max_value=low + 4), label="step")

    @rule(step=STEP)
    def save(self, step: int) -> None:
        """Any step: saved and committed, refused (it exists) or skipped (lower than the
        latest, as in Orbax)."""
        if step in self.committed:
            with pytest.raises(ValueError, match="already exists"):
                self.manager.save(step, _tree(step))
            return
        started = self.manager.save(step, _tree(step))
        self.manager.wait_until_finished()
        assert started == self._expect_started(step)
        if started:
            self._retain(step)

    @rule(data=st.data(), point=st.integers(0, 10), leave_temporary=st.booleans())
    def crash_save(self, data: st.DataObject, point: int, leave_temporary: bool) -> None:
        """A storage primitive fails before the commit; with ``leave_temporary`` the
        removal of the temporary fails too, as when the process is killed."""
        step = self._next_step(data)
        points = CRASH_POINTS[self.strategy]
        key = self._key(points[point % len(points)], step)
        self.backend.fail_on[key] = Injected(f"injected failure of {key}")
        if leave_temporary:
            self.backend.fail_on["remove_tree"] = Injected("injected: no cleanup")
        try:
            assert self.manager.save(step, _tree(step))
            with pytest.raises(Injected):
                self.manager.wait_until_finished()
        finally:
            self.backend.fail_on.clear()
        at_marker = (
            key == self._key(COMMIT_KEY[self.strategy], step) and self.strategy == "commit_file"
        )
        if leave_temporary:
            self.leftovers += 1
            if at_marker and step not in self.empty_finals:
                self.leftovers += 1  # and the empty step directory made for the marker
                self.empty_finals.add(step)
        elif at_marker:
            self._empty_final_gone(step)  # the failed commit dropped it

    @rule(data=st.data(), crash=st.booleans())
    def save_then_finalize(self, data: st.DataObject, crash: bool) -> None:
        """An asynchronous save held just before its commit: checked while pending, then
        finalized, or crashed at the commit."""
        step = self._next_step(data)
        key = self._key(COMMIT_KEY[self.strategy], step)
        gate = self.backend.gate(key)
        try:
            assert self.manager.save(step, _tree(step))
            assert self.backend.entered[key].wait(30), "the save never reached its commit"
            self.pending = step
            self.check_visible_steps()
            self.check_temporaries()
            if crash:
                self.backend.fail_on[key] = Injected(f"injected failure of {key}")
            gate.set()
            if crash:
                with pytest.raises(Injected):
                    self.manager.wait_until_finished()
                self._empty_final_gone(step)  # the failed commit dropped it
            else:
                self.manager.wait_until_finished()
                self._retain(step)
        finally:
            self.pending = None
            gate.set()
            self.backend.gates.pop(key, None)
            self.backend.entered.pop(key, None)
            self.backend.fail_on.clear()

    @precondition(lambda self: bool(self.committed))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from(sorted(self.committed)))
        self.manager.delete(step)
        self.committed.discard(step)

    @rule()
    def cleanup(self) -> None:
        ckpt.cleanup_temporary_paths(self.root, atomicity=self.strategy)
        self.leftovers = 0
        self.empty_finals.clear()

    @rule()
    def restart(self) -> None:
        """A new process: a new manager, which removes the older temporaries."""
        self.manager.close()
        self.manager = self._open()
        self.leftovers = 0
        self.empty_finals.clear()

    @precondition(lambda self: bool(self.committed))
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from(sorted(self.committed)))
        out = self.manager.restore(step)
        assert out["step"] == step
        np.testing.assert_array_equal(out["w"], _tree(step)["w"])

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def check_visible_steps(self) -> None:
        on_storage = ckpt.checkpoint_steps(self.root, atomicity=self.strategy)
        assert on_storage == sorted(self.committed)
        expected = set(self.committed)
        if self.pending is not None:
            expected.add(self.pending)  # as in Orbax: the step of a save in progress
        assert self.manager.all_steps() == sorted(expected)

    @invariant()
    def check_temporaries(self) -> None:
        temporaries = ckpt.all_temporary_paths(self.root, atomicity=self.strategy)
        # A save held at its commit has its temporary; under commit_file also the still
        # empty step directory its marker goes into (an empty leftover to cleanup).
        per_pending = 2 if self.strategy == "commit_file" else 1
        if self.pending in self.empty_finals:
            per_pending -= 1  # its step directory is already counted among the leftovers
        assert len(temporaries) == self.leftovers + per_pending * (self.pending is not None)
        for tmp in temporaries:
            assert tmp.get().parent.parent == ckpt.registry.to_path(self.root) or (
                tmp.get().parent == ckpt.registry.to_path(self.root)
            )

    @invariant()
    def nothing_outside_the_root(self) -> None:
        assert set(os.listdir(self.tmp)) <= {"ckpt.toml", "root"}


class RenameModel(CheckpointModel):
    strategy = "rename"


class CommitFileModel(CheckpointModel):
    strategy = "commit_file"


_stateful = settings(
    max_examples=EXAMPLES or 20,
    stateful_step_count=16,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRenameModel = _stateful(RenameModel).TestCase
TestCommitFileModel = _stateful(CommitFileModel).TestCase
