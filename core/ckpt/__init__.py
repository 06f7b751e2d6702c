"""ckpt: atomic checkpoints for JAX and numpy on any storage.

A crash, a preemption or a second writer never leaves a checkpoint that looks complete but
is not, and never loses one that was. See the documentation in ``docs/``.
"""

from ckpt.backend import Backend, Capabilities, Entry
from ckpt.cleanup import all_temporary_paths, cleanup_temporary_paths
from ckpt.committed import content_path, delete_checkpoint
from ckpt.discovery import PathState, is_path_finalized, is_path_temporary, path_state
from ckpt.errors import (
    BackendNotInstalledError,
    CommitConflictError,
    CommitNotDurableError,
    ConfigError,
    CorruptCheckpointError,
    InvalidPathError,
    UnknownStrategyError,
    UnsafePathError,
    UnsupportedStrategyError,
    ValidationError,
)
from ckpt.hookspecs import hookimpl
from ckpt.layout import COMMIT_SUCCESS_FILE, METADATA_FILE, TMP_DIR_SUFFIX
from ckpt.manifest import MANIFEST_FILE
from ckpt.registry import (
    get_backend,
    get_strategy,
    list_backends,
    list_strategies,
    strategy_for,
)
from ckpt.step import (
    Metadata,
    NameFormat,
    any_checkpoint_step,
    build_step_path,
    checkpoint_steps,
    checkpoint_steps_paths,
    composite_name_format,
    find_step_path,
    get_save_directory,
    latest_step_metadata,
    maybe_find_step_metadata,
    standard_name_format,
    step_from_checkpoint_name,
)
from ckpt.step_metadata import StepMetadata
from ckpt.strategy import FileOptions, ReadOnlyTemporaryPath, Scan, TemporaryPath

__version__ = "0.1.0"

__all__ = [
    "COMMIT_SUCCESS_FILE",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "TMP_DIR_SUFFIX",
    "Backend",
    "BackendNotInstalledError",
    "Capabilities",
    "CommitConflictError",
    "CommitNotDurableError",
    "ConfigError",
    "CorruptCheckpointError",
    "Entry",
    "FileOptions",
    "InvalidPathError",
    "Metadata",
    "NameFormat",
    "PathState",
    "ReadOnlyTemporaryPath",
    "Scan",
    "StepMetadata",
    "TemporaryPath",
    "UnknownStrategyError",
    "UnsafePathError",
    "UnsupportedStrategyError",
    "ValidationError",
    "all_temporary_paths",
    "any_checkpoint_step",
    "build_step_path",
    "checkpoint_steps",
    "checkpoint_steps_paths",
    "cleanup_temporary_paths",
    "composite_name_format",
    "content_path",
    "delete_checkpoint",
    "find_step_path",
    "get_backend",
    "get_save_directory",
    "get_strategy",
    "hookimpl",
    "is_path_finalized",
    "is_path_temporary",
    "latest_step_metadata",
    "list_backends",
    "list_strategies",
    "maybe_find_step_metadata",
    "path_state",
    "standard_name_format",
    "step_from_checkpoint_name",
    "strategy_for",
]

# The checkpointing layer imports jax: load it on first use so that `import ckpt` (and the
# CLI) stay light.
_LAZY_ATTRS = {
    "Checkpointer": "ckpt.checkpointer",
    "AsyncCheckpointer": "ckpt.async_checkpointer",
    "CheckpointManager": "ckpt.manager",
    "partial": "ckpt.partial",
}
__all__ += ["AsyncCheckpointer", "CheckpointManager", "Checkpointer", "partial"]

import typing as _typing  # noqa: E402

if _typing.TYPE_CHECKING:
    from ckpt import partial
    from ckpt.async_checkpointer import AsyncCheckpointer
    from ckpt.checkpointer import Checkpointer
    from ckpt.manager import CheckpointManager


def __getattr__(name: str) -> object:
    module_name = _LAZY_ATTRS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'ckpt' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(module_name)
    value = module if name == "partial" else getattr(module, name)
    globals()[name] = value
    return value
