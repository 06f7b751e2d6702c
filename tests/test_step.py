"""NameFormat, step helpers and discovery: the Orbax edge cases (orbax-semantics.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import ckpt


def _mkdirs(root: Path, names: list[str]) -> None:
    """Directories holding a file (an empty one is the leftover of an interrupted
    ``commit_file`` commit: temporary, never a step)."""
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "data").write_bytes(b"x")


@pytest.mark.parametrize(
    ("prefix", "length", "step", "expected"),
    [
        (None, None, 0, "0"),
        (None, 2, 1, "01"),
        (None, 2, 10, "10"),
        ("aa", None, 1, "aa_1"),
        ("aa", 2, 0, "aa_00"),
    ],
)
def test_build_name(prefix: str | None, length: int | None, step: int, expected: str) -> None:
    assert ckpt.standard_name_format(prefix, length).build_name(step) == expected


ALL = ["0", "1", "10", "11", "100", "101", "111", "00", "01", "010"]


def test_find_all_unpadded(tmp_path: Path) -> None:
    _mkdirs(tmp_path, ALL)
    steps = sorted(m.step for m in ckpt.standard_name_format().find_all(tmp_path))
    assert steps == [0, 1, 10, 11, 100, 101, 111]


def test_find_all_padded(tmp_path: Path) -> None:
    _mkdirs(tmp_path, [*ALL, "000", "001", "011"])
    found = {m.path.name for m in ckpt.standard_name_format(None, 2).find_all(tmp_path)}
    assert found == {"00", "01", "10", "11", "100", "101", "111"}


def test_prefix_is_exact(tmp_path: Path) -> None:
    _mkdirs(tmp_path, ["aa_1", "a_1", "aaa_1", "aa_2"])
    found = sorted(m.step for m in ckpt.standard_name_format("aa").find_all(tmp_path))
    assert found == [1, 2]


def test_prefix_with_regex_characters(tmp_path: Path) -> None:
    _mkdirs(tmp_path, ["a.b_1", "axb_2"])
    assert [m.step for m in ckpt.standard_name_format("a.b").find_all(tmp_path)] == [1]


def test_find_all_ignores_temps_files_and_symlinks(tmp_path: Path) -> None:
    _mkdirs(tmp_path, ["1", "2.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-99"])
    (tmp_path / "4").write_text("a file, not a checkpoint")
    os.symlink(tmp_path / "1", tmp_path / "5")
    assert [m.step for m in ckpt.standard_name_format().find_all(tmp_path)] == [1]


def test_find_all_missing_base_is_empty(tmp_path: Path) -> None:
    assert list(ckpt.standard_name_format().find_all(tmp_path / "nope")) == []


def test_str_and_composite(tmp_path: Path) -> None:
    a, b = ckpt.standard_name_format("a"), ckpt.standard_name_format("b")
    assert str(ckpt.standard_name_format("step", 8)) == 'StandardNameFormat("step_00001234")'
    composite = ckpt.composite_name_format(a, [a, b])
    assert (
        str(composite) == 'Composite([StandardNameFormat("a_1234"),StandardNameFormat("b_1234")])'
    )
    with pytest.raises(ValueError, match="must be present"):
        ckpt.composite_name_format(a, [b])
    _mkdirs(tmp_path, ["a_1", "b_2", "b_1"])
    found = sorted((m.step, m.path.name) for m in composite.find_all(tmp_path))
    assert found == [(1, "a_1"), (1, "b_1"), (2, "b_2")]
    assert composite.find_step(tmp_path, 2).path.name == "b_2"
    with pytest.raises(ValueError) as info:
        composite.find_step(tmp_path, 3)
    assert "a_3" in str(info.value) and "b_3" in str(info.value)
    assert composite.build_name(7) == "a_7"


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("0000", 0),
        ("checkpoint_003400", 3400),
        ("foo_bar_1000", 1000),
        ("foobar_000505.orbax-checkpoint-tmp-13124", 505),
    ],
)
def test_step_from_checkpoint_name(name: str, step: int) -> None:
    assert ckpt.step_from_checkpoint_name(name) == step


@pytest.mark.parametrize(
    "name",
    [
        "abc",
        "checkpoint_",
        "checkpoint_1010_",
        "_191",
        ".orbax-checkpoint-tmp-191913",
        "0.orbax-checkpoint-",
    ],
)
def test_step_from_checkpoint_name_invalid(name: str) -> None:
    with pytest.raises(ValueError):
        ckpt.step_from_checkpoint_name(name)


def test_checkpoint_steps(tmp_path: Path) -> None:
    _mkdirs(tmp_path, ["2", "checkpoint_01", "checkpoint", "1000.orbax-checkpoint-tmp-1010101"])
    assert ckpt.checkpoint_steps(tmp_path) == [1, 2]
    assert [p.name for p in ckpt.checkpoint_steps_paths(tmp_path)] == ["checkpoint_01", "2"]
    assert ckpt.any_checkpoint_step(tmp_path) in (1, 2)
    assert ckpt.checkpoint_steps(tmp_path / "missing") == []


def test_any_checkpoint_step_none(tmp_path: Path) -> None:
    _mkdirs(tmp_path, ["5.orbax-checkpoint-tmp", "checkpoint"])
    assert ckpt.any_checkpoint_step(tmp_path) is None


def test_get_save_directory() -> None:
    assert str(ckpt.get_save_directory(3, "/dir", None, None, None, 2)) == "/dir/03"
    got = ckpt.get_save_directory(555, "/dir", "params", "foo", None, 8)
    assert str(got) == "/dir/foo_00000555/params"
    assert str(ckpt.get_save_directory(1, "/dir", override_directory="/x")) == "/x"
    with pytest.raises(ValueError):
        ckpt.get_save_directory(1, None)  # type: ignore[arg-type]
    with pytest.raises(ckpt.UnsafePathError):
        ckpt.get_save_directory(1, "/dir", name="..")


def test_find_step_and_maybe(tmp_path: Path) -> None:
    _mkdirs(tmp_path, ["3", "4.orbax-checkpoint-tmp-1"])
    fmt = ckpt.standard_name_format()
    assert fmt.find_step(tmp_path, 3).path.name == "3"
    with pytest.raises(ValueError, match="step=4"):
        fmt.find_step(tmp_path, 4)
    assert ckpt.maybe_find_step_metadata(tmp_path, fmt, step=4) is None
    assert ckpt.find_step_path(tmp_path, fmt, step=4, include_uncommitted=True).name == (
        "4.orbax-checkpoint-tmp-1"
    )
    assert ckpt.find_step_path(tmp_path, fmt, step=3, include_uncommitted=True).name == "3"
    assert ckpt.latest_step_metadata(tmp_path, fmt).step == 3  # type: ignore[union-attr]
    assert ckpt.latest_step_metadata(tmp_path / "empty", fmt) is None


def test_metadata_is_lazy_and_comparable(tmp_path: Path) -> None:
    _mkdirs(tmp_path, ["7"])
    (found,) = ckpt.standard_name_format().find_all(tmp_path)
    assert found == ckpt.Metadata(7, tmp_path / "7")
    assert hash(found) == hash(ckpt.Metadata(7, tmp_path / "7"))
    assert found.path.name == "7" and found.step == 7


@pytest.mark.parametrize("prefix", ["..", "a/b", "", "x\\y"])
def test_step_prefix_that_escapes_is_refused(prefix: str) -> None:
    with pytest.raises(ckpt.UnsafePathError):
        ckpt.standard_name_format(prefix)


def test_negative_step_is_refused() -> None:
    with pytest.raises(ValueError):
        ckpt.standard_name_format().build_name(-1)
