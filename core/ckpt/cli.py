"""The ``ckpt`` command line: demo, ls, gc, verify, backends."""

from __future__ import annotations

import asyncio
import datetime
import time
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
async def _describe_entries(root: Any, res: registry.Resolution) -> list[dict[str, Any]]:
    backend: Backend = res.backend
    scan = await scan_root(root, backend, res.strategy)
    rows: list[tuple[Any, str, PathState]] = [
        (root / n, n, PathState.FINALIZED) for n in scan.finalized
    ] + [(root / n, n, PathState.UNKNOWN) for n in scan.unknown]
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

    return list(await asyncio.gather(*(one(*row) for row in rows)))


def _step_key(name: str) -> tuple[int, str]:
    from ckpt.step import step_from_checkpoint_name

    try:
        return step_from_checkpoint_name(name.rpartition("/")[2]), name
    except ValueError:
        return 1 << 62, name


@app.command("ls")
def ls(
    directory: Annotated[str, typer.Argument(help="Checkpoint root (path or URL).")],
    atomicity: Annotated[str | None, typer.Option(help="Strategy to judge commits by.")] = None,
) -> None:
    """List checkpoints with their state (finalized/temporary/unknown), size and commit time."""
    root = to_path(directory)
    res = registry.resolve(root, atomicity)
    rows = _sync.run(_describe_entries(root, res))
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


# -- gc ---------------------------------------------------------------------------------------
@app.command("gc")
def gc(
    directory: Annotated[str, typer.Argument(help="Checkpoint root (path or URL).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would go.")] = False,
    older_than: Annotated[
        float, typer.Option(help="Spare temporaries younger than this many seconds.")
    ] = 0.0,
) -> None:
    """Remove temporary checkpoints (never finalized or unknown directories, never symlinks)."""
    root = to_path(directory)
    res = registry.resolve(root)
    cutoff = time.time_ns() - int(older_than * 1e9) if older_than else None

    async def find() -> list[Any]:
        entries = None if dry_run else (await repair_async(root, res.backend, res.strategy))[0]
        return await all_temporary_paths_async(
            root, res.backend, strategy=res.strategy, created_before_ns=cutoff, entries=entries
        )

    temps = _sync.run(find())
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
def verify(
    path: Annotated[str, typer.Argument(help="A checkpoint (path or URL).")],
    atomicity: Annotated[str | None, typer.Option(help="Strategy to judge commits by.")] = None,
) -> None:
    """Check that a checkpoint is committed and every array in it reads back."""
    from ckpt import tree_format

    final = to_path(path)
    res = registry.resolve(final, atomicity)
    state = _sync.run(path_state_async(final, res.strategy, res.backend))
    if state != PathState.FINALIZED:
        _io.err.print(f"[red]{final} is {state.value}, not a committed checkpoint[/]")
        raise typer.Exit(1)
    where = _sync.run(owner(res.backend, final, res.strategy))[1]
    try:
        meta = _sync.run(read_step_metadata(res.backend, where))
        tree_meta = _sync.run(tree_format.tree_metadata(res.backend, where))
        leaves = tree_meta.get("leaves", [])
        with _progress.byte_progress(f"reading {final}", _progress.wanted(None)) as bar:
            _sync.run(tree_format.read(res.backend, where, progress=bar))
    except Exception as exc:
        _io.err.print(f"[red]{final}: {type(exc).__name__}: {exc}[/]")
        raise typer.Exit(1) from exc
    _io.out.print(
        f"[green]OK[/] {final}: committed {_when(meta.commit_timestamp_nsecs if meta else None)},"
        f" {len(leaves)} leaves, {_human(_sync.run(res.backend.tree_size(where)))}"
    )


# -- backends ---------------------------------------------------------------------------------
@app.command("backends")
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
def demo(
    directory: Annotated[str, typer.Argument(help="Where to write checkpoints.")] = "ckpt-demo",
    steps: Annotated[int, typer.Option(help="Training steps (one checkpoint each).")] = 8,
    max_to_keep: Annotated[int, typer.Option(help="Checkpoints kept.")] = 3,
) -> None:
    """Train a tiny JAX model, checkpoint every step with the manager, restore the latest."""
    from ckpt.demo import run_demo

    run_demo(directory, steps=steps, max_to_keep=max_to_keep, console=_io.out)
