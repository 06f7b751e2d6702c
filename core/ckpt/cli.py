"""The ``ckpt`` command line: demo, ls, gc, verify, backends."""

from __future__ import annotations

import asyncio
import datetime
import functools
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ckpt import _progress, _sync, config, registry
from ckpt.backend import Backend
from ckpt.cleanup import all_temporary_paths_async, remove_temporaries, repair_async
from ckpt.committed import owner
from ckpt.discovery import PathState, path_state_async, scan_root
from ckpt.paths import to_path
from ckpt.plugins import manager as plugin_manager
from ckpt.step_metadata import read_step_metadata

app = typer.Typer(
    help="ckpt: atomic checkpoints on any storage.", no_args_is_help=True, add_completion=False
)


class _Consoles:
    """Consoles made on use, so the terminal width is read when a command runs."""

    @property
    def out(self) -> Console:
        return Console()

    @property
    def err(self) -> Console:
        return Console(stderr=True)


_io = _Consoles()


def main() -> None:
    """Console-script entry point."""
    app()


class _State:
    debug = False


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of an error.")
    ] = False,
) -> None:
    """ckpt: atomic checkpoints on any storage."""
    _State.debug = debug or bool(os.environ.get("CKPT_DEBUG"))


#: Missing-credential errors of the storage clients (matched by name: no client is imported
#: here), and what to set, per scheme.
_CREDENTIAL_ERRORS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "DefaultCredentialsError",
    "RefreshError",
}
_CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE for a profile in "
    "~/.aws/credentials)",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
    "`gcloud auth application-default login`",
}
_CREDENTIAL_HINTS["s3a"] = _CREDENTIAL_HINTS["s3"]
_CREDENTIAL_HINTS["gcs"] = _CREDENTIAL_HINTS["gs"]


class _UserError(Exception):
    """An everyday mistake, reported as one line (the message) without a traceback."""


def _one_line(exc: BaseException, location: str | None) -> str:
    name = type(exc).__name__
    if name in _CREDENTIAL_ERRORS:
        scheme = registry.scheme_of(location) if location else ""
        hint = _CREDENTIAL_HINTS.get(scheme, "configure the storage client's credentials")
        return f"no credentials for {location} ({name}: {exc}); {hint}."
    text = " ".join(str(exc).split())
    if isinstance(exc, _UserError):
        return text
    return f"{name}: {text}" if text else name


def _errors_as_one_line(func: Callable[..., None]) -> Callable[..., None]:
    """Report an error of a command as one line on stderr and exit 1 (``--debug``: raise
    it with its traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            # Usage errors (click's, through typer) keep click's own report.
            if _State.debug or type(exc).__module__.split(".")[0] == "click":
                raise
            location = next(
                (kwargs[k] for k in ("directory", "path") if isinstance(kwargs.get(k), str)),
                None,
            )
            message = _one_line(exc, location)
            print(
                f"ckpt {func.__name__}: error: {message} (--debug shows the traceback)",
                file=sys.stderr,
            )
            raise typer.Exit(1) from None

    return wrapper


async def _require_dir(backend: Backend, root: Any) -> None:
    """_UserError unless ``root`` is an existing directory."""
    if await backend.is_dir(root):
        return
    if await backend.exists(root):
        raise _UserError(f"{root} is a file, not a directory of checkpoints.")
    raise _UserError(f"{root} does not exist ({backend.describe()}).")


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _when(ns: int | None) -> str:
    if not ns:
        return "-"
    return datetime.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


# -- ls ---------------------------------------------------------------------------------------
def _is_step_name(name: str) -> bool:
    """A step name of the standard formats (``N``, ``<prefix>_N``)."""
    return name.isdigit() or (
        "_" in name and name.rpartition("_")[2].isdigit() and bool(name.rpartition("_")[0])
    )


async def _describe_entries(
    root: Any, res: registry.Resolution
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of the steps and temporaries; names of the other directories."""
    backend: Backend = res.backend
    await _require_dir(backend, root)
    scan = await scan_root(root, backend, res.strategy)
    named = [(n, PathState.FINALIZED) for n in scan.finalized] + [
        (n, PathState.UNKNOWN) for n in scan.unknown
    ]
    rows: list[tuple[Any, str, PathState]] = [
        (root / n, n, state) for n, state in named if _is_step_name(n)
    ]
    others = sorted(n for n, _ in named if not _is_step_name(n))
    prefix = str(root).rstrip("/") + "/"
    for tmp in scan.temporary:  # what the strategies show, nested ones by relative path
        rows.append((tmp.get(), str(tmp.get()).removeprefix(prefix), PathState.TEMPORARY))

    async def one(path: Any, label: str, state: PathState) -> dict[str, Any]:
        row: dict[str, Any] = {"name": label, "state": state, "size": None, "commit": None}
        if state == PathState.FINALIZED:
            where = (await owner(backend, path, res.strategy))[1]
        else:
            where = path
        try:
            meta = await read_step_metadata(backend, where)
        except ValueError:
            meta = None
        if meta is not None:
            row["commit"] = meta.commit_timestamp_nsecs
        row["size"] = await backend.tree_size(where)
        return row

    return list(await asyncio.gather(*(one(*row) for row in rows))), others


def _step_key(name: str) -> tuple[int, str]:
    from ckpt.step import step_from_checkpoint_name

    try:
        return step_from_checkpoint_name(name.rpartition("/")[2]), name
    except ValueError:
        return 1 << 62, name


@app.command("ls")
@_errors_as_one_line
def ls(
    directory: Annotated[str, typer.Argument(help="Checkpoint root (path or URL).")],
    atomicity: Annotated[str | None, typer.Option(help="Strategy to judge commits by.")] = None,
) -> None:
    """List checkpoints with their state (finalized/temporary/unknown), size and commit time.

    Directories whose names are not steps (``N`` or ``<prefix>_N``) are listed apart."""
    root = to_path(directory)
    res = registry.resolve(root, atomicity)
    rows, others = _sync.run(_describe_entries(root, res))
    table = Table(title=f"{root}  ({res.backend.describe()}, strategy {res.name})")
    for col in ("name", "state", "size", "committed"):
        table.add_column(col, justify="right" if col == "size" else "left")
    colors = {PathState.FINALIZED: "green", PathState.TEMPORARY: "yellow", PathState.UNKNOWN: "red"}
    for row in sorted(rows, key=lambda r: _step_key(r["name"])):
        state = row["state"]
        table.add_row(
            row["name"],
            f"[{colors[state]}]{state.value}[/]",
            _human(row["size"]),
            _when(row["commit"]) if state == PathState.FINALIZED else "-",
        )
    _io.out.print(table)
    if not rows:
        _io.out.print("no checkpoints here")
    if others:
        _io.out.print(
            "not checkpoint steps (names are not N or <prefix>_N; ignored): "
            + ", ".join(f"{name}/" for name in others),
            markup=False,
        )


# -- gc ---------------------------------------------------------------------------------------
async def _old_temporaries(
    root: Any, backend: Backend, strategy: Any, older_than: float, *, repair: bool
) -> tuple[list[Any], int]:
    """The temporaries under ``root`` older than ``older_than`` seconds by their newest
    modification time (by the creation time in their name where the store cannot tell);
    and how many younger ones were spared. With ``repair``, interrupted replaces are
    repaired first (see :func:`ckpt.cleanup.repair_async`)."""
    await _require_dir(backend, root)
    entries = (await repair_async(root, backend, strategy))[0] if repair else None
    temps = await all_temporary_paths_async(root, backend, strategy=strategy, entries=entries)
    if not older_than:
        return temps, 0
    cutoff = time.time_ns() - int(older_than * 1e9)
    by_name = {
        str(t.get())
        for t in await all_temporary_paths_async(
            root, backend, strategy=strategy, created_before_ns=cutoff, entries=entries
        )
    }
    stamps = await asyncio.gather(*(backend.modified_ns(t.get()) for t in temps))
    old = [
        t
        for t, stamp in zip(temps, stamps, strict=True)
        if (stamp < cutoff if stamp is not None else str(t.get()) in by_name)
    ]
    return old, len(temps) - len(old)


@app.command("gc")
@_errors_as_one_line
def gc(
    directory: Annotated[str, typer.Argument(help="Checkpoint root (path or URL).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would go.")] = False,
    older_than: Annotated[
        float,
        typer.Option(
            help="Spare temporaries modified less than this many seconds ago (whoever "
            "wrote them: ckpt, Orbax, ...)."
        ),
    ] = 0.0,
) -> None:
    """Remove temporary checkpoints (never finalized or unknown directories, never symlinks)."""
    root = to_path(directory)
    res = registry.resolve(root)
    temps, spared = _sync.run(
        _old_temporaries(root, res.backend, res.strategy, older_than, repair=not dry_run)
    )
    if spared:
        _io.out.print(
            f"sparing {spared} temporary checkpoint(s) modified in the last {older_than:g} s"
        )
    if not temps:
        _io.out.print(f"no temporary checkpoints under {root}")
        return
    for tmp in temps:
        _io.out.print(f"{'would remove' if dry_run else 'removing'} {tmp.get()}")
    if not dry_run:
        _sync.run(remove_temporaries(res.backend, temps))
        _io.out.print(f"removed {len(temps)} temporary checkpoint(s)")


# -- verify -----------------------------------------------------------------------------------
@app.command("verify")
@_errors_as_one_line
def verify(
    path: Annotated[str, typer.Argument(help="A checkpoint (path or URL).")],
    atomicity: Annotated[str | None, typer.Option(help="Strategy to judge commits by.")] = None,
) -> None:
    """Check a committed checkpoint against its integrity manifest: every file present,
    with its recorded size and CRC32C.

    Exit status: 0 all files match; 1 a problem (each printed on its own line); 2 nothing to
    verify against (a checkpoint written before manifests, or by another tool such as
    Orbax).
    """
    from ckpt import tree_format
    from ckpt.manifest import MANIFEST_FILE, Problem, check_files, read_manifest
    from ckpt.tree_integrity import unrecorded_files

    final = to_path(path)
    res = registry.resolve(final, atomicity)
    if not _sync.run(res.backend.exists(final)):
        raise _UserError(f"{final} does not exist ({res.backend.describe()}).")
    state = _sync.run(path_state_async(final, res.strategy, res.backend))
    if not _sync.run(res.backend.exists(final / tree_format.TREE_FILE)) and _sync.run(
        _holds_steps(final, res)
    ):
        raise _UserError(
            f"{final} is a checkpoint root (it holds steps), not a checkpoint: verify one "
            f"step, e.g. `ckpt verify {final}/<step>` (`ckpt ls {final}` lists them)."
        )
    if state != PathState.FINALIZED:
        _io.err.print(f"[red]{final} is {state.value}, not a committed checkpoint[/]")
        raise typer.Exit(1)
    where = _sync.run(owner(res.backend, final, res.strategy))[1]
    try:
        manifest = _sync.run(read_manifest(res.backend, where))
    except ValueError as exc:
        _io.out.print(f"[red]CORRUPT[/] {where / MANIFEST_FILE}: {exc}")
        raise typer.Exit(1) from exc
    if manifest is None:
        try:
            doc = _sync.run(tree_format.tree_metadata(res.backend, where))
        except FileNotFoundError:
            _io.out.print(
                f"[yellow]UNVERIFIED[/] {final}: no {MANIFEST_FILE} and no "
                f"{tree_format.TREE_FILE}: written by another tool (e.g. Orbax); there is "
                "nothing to verify its files against."
            )
            raise typer.Exit(2) from None
        except ValueError as exc:
            _io.out.print(f"[red]CORRUPT[/] {where / tree_format.TREE_FILE}: {exc}")
            raise typer.Exit(1) from exc
        if doc.get("manifest") is not None:
            _io.out.print(
                f"[red]CORRUPT[/] {where / MANIFEST_FILE}: missing (the tree document says "
                "the save recorded one)"
            )
            raise typer.Exit(1)
        _io.out.print(
            f"[yellow]UNVERIFIED[/] {final}: written before integrity manifests (no "
            f"{MANIFEST_FILE}); sizes and checksums cannot be checked. Save it again with "
            "this version of ckpt to protect it."
        )
        raise typer.Exit(2)
    total = sum(r.size for r in manifest.files.values())
    with _progress.byte_progress(f"verifying {final}", _progress.wanted(None, total)) as bar:
        problems = _sync.run(check_files(res.backend, where, manifest, progress=bar))
    # Every file the tree document needs must be recorded, or its data is unproven.
    tree_doc: dict[str, Any] | None = None
    try:
        tree_doc = _sync.run(tree_format.tree_metadata(res.backend, where))
    except FileNotFoundError:
        pass  # already reported: _TREE.json is recorded in every manifest
    except ValueError as exc:
        problems.append(Problem(tree_format.TREE_FILE, "malformed", str(exc)))
    if tree_doc is not None:
        problems += unrecorded_files(tree_doc, manifest)
    problems = sorted(
        {(p.relpath, p.detail): p for p in problems}.values(), key=lambda p: p.relpath
    )
    if problems:
        for p in problems:
            _io.out.print(
                f"[red]CORRUPT[/] {where / p.relpath}: {p.detail}", highlight=False, soft_wrap=True
            )
        _io.err.print(
            f"[red]{final}: {len(problems)} of {len(manifest.files)} file(s) do not match "
            "the manifest[/]"
        )
        raise typer.Exit(1)
    meta = _sync.run(read_step_metadata(res.backend, where))
    _io.out.print(
        f"[green]OK[/] {final}: committed {_when(meta.commit_timestamp_nsecs if meta else None)},"
        f" {len(manifest.files)} files, {_human(total)}, sizes and CRC32C match the manifest"
    )


async def _holds_steps(path: Any, res: registry.Resolution) -> bool:
    """Whether ``path`` holds checkpoint steps or temporaries (a checkpoint root)."""
    scan = await scan_root(path, res.backend, res.strategy)
    return bool(scan.temporary) or any(_is_step_name(n) for n in scan.finalized)


# -- backends ---------------------------------------------------------------------------------
@app.command("backends")
@_errors_as_one_line
def backends(
    path: Annotated[str, typer.Argument(help="Resolve the config key for this path.")] = ".",
) -> None:
    """Installed backends, their capabilities and strategies, and what `atomicity` resolves to."""
    table = Table(title="installed backends")
    for col in ("scheme", "backend", "package", "capabilities", "strategies", "auto"):
        table.add_column(col, overflow="fold")
    by_class: dict[type, list[str]] = {}
    for scheme, cls in registry.list_backends().items():
        by_class.setdefault(cls, []).append(scheme)
    for cls, schemes in by_class.items():
        # A backend whose capabilities depend on the bucket lists each variant.
        variants = getattr(cls, "capability_variants", None) or {
            "": (getattr(cls, "capabilities", None), getattr(cls, "default_strategy", "-"))
        }
        for variant, (caps, default) in variants.items():
            works = [
                name
                for name, strat in registry.list_strategies().items()
                if caps is not None and all(caps.has(c) for c in getattr(strat, "requires", ()))
            ]
            table.add_row(
                ", ".join(schemes) + (f" ({variant})" if variant else ""),
                cls.__name__,
                getattr(cls, "package", "") or "-",
                ", ".join(caps.names()) if caps is not None else "-",
                ", ".join(works) or "-",
                default,
            )
    _io.out.print(table)
    _io.out.print(
        "strategies: "
        + ", ".join(
            f"{n} (needs {', '.join(s.requires) or 'nothing'})"
            for n, s in registry.list_strategies().items()
        )
    )
    failures = plugin_manager.registry().failures
    for failure in failures:
        _io.err.print(f"[red]plugin {failure.name} failed to load: {failure.error}[/]")
    try:
        res = registry.resolve(to_path(path))
        cfg = config.load_config()
        _io.out.print(
            f"here: {to_path(path)} -> backend {res.backend.describe()}, atomicity "
            f"[bold]{res.name}[/] (from {res.source}; config file: {cfg.source or 'none'})"
        )
    except ValueError as exc:
        _io.err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc


# -- demo -------------------------------------------------------------------------------------
@app.command("demo")
@_errors_as_one_line
def demo(
    directory: Annotated[str, typer.Argument(help="Where to write checkpoints.")] = "ckpt-demo",
    steps: Annotated[int, typer.Option(help="Training steps (one checkpoint each).")] = 8,
    max_to_keep: Annotated[int, typer.Option(help="Checkpoints kept.")] = 3,
) -> None:
    """Train a tiny JAX model, checkpoint every step with the manager, restore the latest."""
    from ckpt.demo import run_demo

    root = to_path(directory)
    backend = registry.get_backend(root)
    if _sync.run(backend.exists(root)) and not _sync.run(backend.is_dir(root)):
        raise _UserError(f"{root} is a file; give the demo a directory to write checkpoints to.")
    run_demo(
        directory,
        steps=steps,
        max_to_keep=max_to_keep,
        console=_io.out,
        ls_command=f"{_ckpt_command()} ls {shlex.quote(directory)}",
    )


def _ckpt_command() -> str:
    """How to run this ``ckpt`` from the current directory: ``ckpt`` if that is the one on
    PATH, else the path of the console script beside this Python (e.g. ``.venv/bin/ckpt``
    after ``python3 dev.py demo``), else ``python -m ckpt``."""
    script = Path(sys.executable).parent / ("ckpt.exe" if os.name == "nt" else "ckpt")
    if script.exists():
        on_path = shutil.which("ckpt")
        if on_path and Path(on_path).resolve() == script.resolve():
            return "ckpt"
        try:
            relative = os.path.relpath(script)
        except ValueError:  # another drive
            relative = str(script)
        shown = relative if not relative.startswith("..") else str(script)
        return shlex.quote(shown if os.sep in shown else f".{os.sep}{shown}")
    return f"{shlex.quote(sys.executable)} -m ckpt"
