"""Step naming and discovery: ``NameFormat``, ``Metadata`` and the step helpers.

Discovery lists the base directory once and lets the strategy decide which names are
committed (no per-step I/O under ``rename``; one batched check under ``commit_file``).
The latest step (:func:`latest_step_metadata`, ``CheckpointManager``) is then confirmed
by the classifier restores use (:func:`ckpt.path_state`), so what discovery picks is what
a restore accepts. Paths of found steps are built lazily, only when asked for.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from upath import UPath

from ckpt import _sync
from ckpt.backend import Entry
from ckpt.cleanup import all_temporary_paths_async
from ckpt.discovery import PathState, path_state_async
from ckpt.errors import UnsafePathError
from ckpt.layout import RESERVED_INFIX, TMP_DIR_SUFFIX, check_safe_name, is_temporary_name
from ckpt.paths import to_path
from ckpt.registry import resolve

__all__ = [
    "Metadata",
    "NameFormat",
    "any_checkpoint_step",
    "build_step_path",
    "checkpoint_steps",
    "checkpoint_steps_paths",
    "composite_name_format",
    "find_step_path",
    "get_save_directory",
    "latest_step_metadata",
    "maybe_find_step_metadata",
    "standard_name_format",
    "step_from_checkpoint_name",
    "step_prefix_with_underscore",
]


class Metadata:
    """A found step: its number and its path (built on first access)."""

    __slots__ = ("_base", "_name", "_path", "step")

    def __init__(
        self, step: int, path: Any = None, *, base: UPath | None = None, name: str | None = None
    ) -> None:
        self.step = int(step)
        self._path: UPath | None = to_path(path) if path is not None else None
        self._base = base
        self._name = name
        if self._path is None and (base is None or name is None):
            raise ValueError("Metadata needs a path, or a base and a name.")

    @property
    def path(self) -> UPath:
        if self._path is None:
            assert self._base is not None and self._name is not None
            self._path = self._base / self._name
        return self._path

    @property
    def name(self) -> str:
        return self._name if self._name is not None else self.path.name

    def _key(self) -> tuple[int, str]:
        if self._path is None:
            return self.step, f"{str(self._base).rstrip('/')}/{self._name}"
        return self.step, str(self._path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Metadata) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Metadata(step={self.step}, path={self._key()[1]!r})"


@runtime_checkable
class NameFormat(Protocol):
    """How step numbers map to directory names, and how steps are found."""

    def build_name(self, step: int) -> str: ...

    def find_all(self, base_path: Any) -> Iterator[Metadata]: ...

    def find_step(self, base_path: Any, step: int) -> Metadata: ...


def step_prefix_with_underscore(step_prefix: str | None) -> str:
    """``"<prefix>_"``, or ``""`` without a prefix (how step names begin, as in Orbax)."""
    return "" if step_prefix is None else f"{step_prefix}_"


def _list(path: UPath, atomicity: str | None) -> tuple[Any, list[Entry]]:
    resolution = resolve(path, atomicity)
    return resolution, _sync.run(resolution.backend.list_dir(path))


@dataclasses.dataclass(frozen=True)
class _StandardNameFormat:
    """``(prefix_)?step``, optionally zero-padded to a fixed length."""

    step_prefix: str | None = None
    step_format_fixed_length: int | None = None
    atomicity: str | None = None

    def __post_init__(self) -> None:
        if self.step_prefix is not None:
            check_safe_name(self.step_prefix, "step prefix")
            if is_temporary_name(self.step_prefix) or RESERVED_INFIX in self.step_prefix:
                raise UnsafePathError(
                    f"Refusing step prefix {self.step_prefix!r}: names holding "
                    f"{TMP_DIR_SUFFIX!r} or {RESERVED_INFIX!r} are temporary or internal "
                    "names (never listed as steps, removed by cleanup)."
                )
        if self.step_format_fixed_length is not None and self.step_format_fixed_length < 0:
            raise ValueError("step_format_fixed_length must be >= 0.")

    def __str__(self) -> str:
        return f'StandardNameFormat("{self.build_name(1234)}")'

    def build_name(self, step: int) -> str:
        if step < 0:
            raise ValueError(f"Step must be >= 0, got {step}.")
        if self.step_format_fixed_length:
            digits = f"{step:0{self.step_format_fixed_length}d}"
        else:
            digits = str(step)
        return f"{step_prefix_with_underscore(self.step_prefix)}{digits}"

    @property
    def _regex(self) -> re.Pattern[str]:
        n = self.step_format_fixed_length
        # ASCII digits only: "\u0663" (Arabic-Indic 3) must not be taken for step 3.
        group = rf"(0[0-9]{{{n - 1}}}|[1-9][0-9]{{{n - 1}}}[0-9]*)" if n else r"(0|[1-9][0-9]*)"
        prefix = re.escape(step_prefix_with_underscore(self.step_prefix))
        return re.compile(f"{prefix}{group}", re.DOTALL)  # used with fullmatch

    def parse(self, name: str) -> int | None:
        match = self._regex.fullmatch(name)
        return int(match.group(1)) if match else None

    def find_all(self, base_path: Any) -> Iterator[Metadata]:
        base = to_path(base_path)
        resolution, entries = _list(base, self.atomicity)
        regex = self._regex
        matching = [e for e in entries if regex.fullmatch(e.name)]
        names = _sync.run(resolution.strategy.finalized_names(resolution.backend, base, matching))
        return iter(
            [Metadata(int(regex.fullmatch(n).group(1)), base=base, name=n) for n in names]  # type: ignore[union-attr]
        )

    def find_step(self, base_path: Any, step: int) -> Metadata:
        base = to_path(base_path)
        resolution = resolve(base, self.atomicity)
        name = self.build_name(step)
        path = base / name
        if _sync.run(resolution.strategy.is_finalized(resolution.backend, path)):
            return Metadata(step, path)
        raise ValueError(
            f"No committed step path found with name={name}, NameFormat={self} for "
            f"step={step} under {base}."
        )


@dataclasses.dataclass(frozen=True)
class _CompositeNameFormat:
    """Writes with one format, reads with several (first match wins)."""

    write_name_format: NameFormat
    read_name_formats: Sequence[NameFormat]

    def __post_init__(self) -> None:
        if self.write_name_format not in self.read_name_formats:
            reads = ",".join(str(f) for f in self.read_name_formats)
            raise ValueError(
                f"write_name_format: {self.write_name_format} must be present in "
                f"read_name_formats: [{reads}]."
            )

    def __str__(self) -> str:
        return f"Composite([{','.join(str(f) for f in self.read_name_formats)}])"

    def build_name(self, step: int) -> str:
        return self.write_name_format.build_name(step)

    def find_all(self, base_path: Any) -> Iterator[Metadata]:
        seen: set[str] = set()
        for fmt in self.read_name_formats:
            for metadata in fmt.find_all(base_path):
                key = metadata._key()[1]
                if key not in seen:
                    seen.add(key)
                    yield metadata

    def find_step(self, base_path: Any, step: int) -> Metadata:
        errors = []
        for fmt in self.read_name_formats:
            try:
                return fmt.find_step(base_path, step)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("\n".join(errors))


def standard_name_format(
    step_prefix: str | None = None,
    step_format_fixed_length: int | None = None,
    *,
    atomicity: str | None = None,
) -> NameFormat:
    """The standard format: ``23``, ``0023``, ``step_23`` or ``step_0023``."""
    return _StandardNameFormat(step_prefix, step_format_fixed_length, atomicity)


def composite_name_format(
    write_name_format: NameFormat, read_name_formats: Sequence[NameFormat]
) -> NameFormat:
    """Write with ``write_name_format``; find steps with any of ``read_name_formats``."""
    return _CompositeNameFormat(write_name_format, tuple(read_name_formats))


def build_step_path(base_path: Any, name_format: NameFormat, step: int) -> UPath:
    """``base_path / name_format.build_name(step)``."""
    return to_path(base_path) / check_safe_name(name_format.build_name(step), "step name")


def find_step_path(
    base_path: Any, name_format: NameFormat, *, step: int, include_uncommitted: bool = False
) -> UPath:
    """The committed path of ``step``; with ``include_uncommitted``, the live temporary of
    that step if there is one. Raises ValueError if none exists."""
    base = to_path(base_path)
    if include_uncommitted:
        final = build_step_path(base, name_format, step)
        resolution = resolve(base)
        temps = _sync.run(
            all_temporary_paths_async(base, resolution.backend, strategy=resolution.strategy)
        )
        for tmp in temps:
            if str(tmp.get_final()) == str(final):
                return tmp.get()
    return name_format.find_step(base, step).path


def maybe_find_step_metadata(
    base_path: Any, name_format: NameFormat, *, step: int
) -> Metadata | None:
    """The metadata of ``step`` under ``base_path`` by ``name_format``, or None if there is
    no such committed step (``name_format.find_step`` raises instead)."""
    try:
        return name_format.find_step(base_path, step)
    except ValueError:
        return None


def latest_step_metadata(base_path: Any, name_format: NameFormat | None = None) -> Metadata | None:
    """The committed step with the highest number, or None.

    Where the backend lets names decide commits (``names_decide_commit``: one LIST finds
    the steps, no per-step request), the chosen step's commit evidence is still checked
    (one request): a name without it (a prefix copied without its marker, another tool's
    save in progress) is skipped for the newest step that has it."""
    name_format = name_format or standard_name_format()
    base = to_path(base_path)
    found = list(name_format.find_all(base))
    resolution = resolve(base, getattr(name_format, "atomicity", None))
    return newest_with_evidence(resolution, found)


def newest_with_evidence(resolution: Any, found: Sequence[Metadata]) -> Metadata | None:
    """The highest step of ``found`` that :func:`ckpt.path_state` finds finalized.

    The listing (``find_all``) decides by names, or by one batched check, what may be a
    step; the step chosen is then confirmed by the same classifier restores use (a few
    checks of that one step, and as many more per step skipped). A name without commit
    evidence, or with a strategy's evidence of a leftover (an empty directory left by an
    interrupted ``commit_file`` commit or delete, a prefix copied without its marker,
    another tool's save in progress), is skipped for the newest step that is finalized."""
    for metadata in sorted(found, key=lambda m: m.step, reverse=True):
        if has_commit_evidence(resolution, metadata.path):
            return metadata
    return None


def has_commit_evidence(resolution: Any, path: UPath) -> bool:
    """Whether ``path`` is a finalized checkpoint (:func:`ckpt.path_state`: the configured
    strategy finds it committed and no strategy finds it a leftover of its layout)."""
    state = _sync.run(path_state_async(path, resolution.strategy, resolution.backend))
    return state is PathState.FINALIZED


def get_save_directory(
    step: int,
    directory: Any,
    name: str | None = None,
    step_prefix: str | None = None,
    override_directory: Any = None,
    step_format_fixed_length: int | None = None,
    step_name_format: NameFormat | None = None,
) -> UPath:
    """The directory to save ``step`` (and item ``name``) into."""
    if directory is None:
        raise ValueError("Directory cannot be None.")
    if override_directory is not None:
        result = to_path(override_directory)
    else:
        fmt = step_name_format or standard_name_format(step_prefix, step_format_fixed_length)
        result = build_step_path(directory, fmt, step)
    if name is not None:
        result = result / check_safe_name(name, "item name")
    return result


_ALLOWED_STEP_NAME = re.compile(r"(.+)_([0-9]+)", re.DOTALL)
_TMP_STEP = re.compile(r".*?_*?([0-9]+)\.orbax-checkpoint-tmp", re.DOTALL)


def _is_ascii_digits(text: str) -> bool:
    """``str.isdigit`` for ASCII only (``"²".isdigit()`` is True, ``int("²")`` fails)."""
    return text.isascii() and text.isdigit()


def step_from_checkpoint_name(name: str) -> int:
    """The step number in a checkpoint name (also temporary names)."""
    if _is_ascii_digits(name):
        return int(name)
    if m := _ALLOWED_STEP_NAME.fullmatch(name):
        return int(m.group(2))
    if m := _TMP_STEP.match(name):
        return int(m.group(1))
    raise ValueError(f"Unrecognized checkpoint name format: {name!r}.")


def _legacy_step_name(name: str) -> bool:
    return _is_ascii_digits(name) or _is_ascii_digits(name.split("_")[-1])


def checkpoint_steps_paths(checkpoint_dir: Any, *, atomicity: str | None = None) -> list[UPath]:
    """Committed checkpoint paths (names ``N`` or ``<anything>_N``) in ``checkpoint_dir``."""
    base = to_path(checkpoint_dir)
    resolution, entries = _list(base, atomicity)
    candidates = [e for e in entries if _legacy_step_name(e.name)]
    names = _sync.run(resolution.strategy.finalized_names(resolution.backend, base, candidates))
    paths = [base / n for n in sorted(names, key=step_from_checkpoint_name)]
    # The newest name is confirmed as restores would (see newest_with_evidence); names
    # above the newest finalized one (an empty leftover directory) are not steps.
    while paths and not has_commit_evidence(resolution, paths[-1]):
        paths.pop()
    return paths


def checkpoint_steps(checkpoint_dir: Any, *, atomicity: str | None = None) -> list[int]:
    """Committed checkpoint steps in ``checkpoint_dir``, ascending."""
    return [
        step_from_checkpoint_name(p.name)
        for p in checkpoint_steps_paths(checkpoint_dir, atomicity=atomicity)
    ]


def any_checkpoint_step(checkpoint_dir: Any, *, atomicity: str | None = None) -> int | None:
    """Some committed step in ``checkpoint_dir`` (stops at the first one found), or None."""
    base = to_path(checkpoint_dir)
    resolution, entries = _list(base, atomicity)
    for entry in entries:
        if _legacy_step_name(entry.name):
            names = _sync.run(
                resolution.strategy.finalized_names(resolution.backend, base, [entry])
            )
            if names:
                return step_from_checkpoint_name(names[0])
    return None
