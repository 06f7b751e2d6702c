"""``ckpt demo``: train a tiny JAX model, checkpoint every step, restart from the latest."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _model() -> tuple[Any, Any, Any]:
    import jax
    import jax.numpy as jnp

    def init(key: Any) -> dict[str, Any]:
        k1, k2 = jax.random.split(key)
        return {
            "dense1": {"w": jax.random.normal(k1, (4, 16)) * 0.5, "b": jnp.zeros(16)},
            "dense2": {"w": jax.random.normal(k2, (16, 1)) * 0.5, "b": jnp.zeros(1)},
        }

    def loss_fn(params: dict[str, Any], x: Any, y: Any) -> Any:
        h = jnp.tanh(x @ params["dense1"]["w"] + params["dense1"]["b"])
        return jnp.mean((h @ params["dense2"]["w"] + params["dense2"]["b"] - y) ** 2)

    @jax.jit
    def train_step(params: dict[str, Any], x: Any, y: Any) -> tuple[dict[str, Any], Any]:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

    return init, train_step, loss_fn


def run_demo(
    directory: str,
    *,
    steps: int = 8,
    max_to_keep: int = 3,
    console: Console | None = None,
    ls_command: str | None = None,
) -> None:
    """Train, checkpoint each step with :class:`ckpt.CheckpointManager`, restore the latest,
    and resume training from it as a restarted job would. The closing hint names
    ``ls_command`` (default ``ckpt ls <directory>``)."""
    import jax
    import jax.numpy as jnp

    import ckpt

    console = console or Console()
    init, train_step, _ = _model()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(256, 4)), dtype=jnp.float32)
    y = jnp.sum(jnp.sin(x), axis=1, keepdims=True)

    with ckpt.CheckpointManager(directory, max_to_keep=max_to_keep) as manager:
        start = manager.latest_step()
        if start is None:
            params, first = init(jax.random.PRNGKey(0)), 0
            console.print(f"[bold]ckpt demo[/]: training from scratch, checkpoints in {directory}")
        else:
            state = manager.restore(start)
            params, first = state["params"], int(state["step"]) + 1
            console.print(f"[bold]ckpt demo[/]: resuming from step {start} in {directory}")
        table = Table(title="training")
        for col in ("step", "loss", "save() returned after (ms)"):
            table.add_column(col, justify="right")
        for step in range(first, first + steps):
            params, loss = train_step(params, x, y)
            t0 = time.perf_counter()
            manager.save(step, {"params": params, "step": step, "loss": float(loss)})
            table.add_row(
                str(step), f"{float(loss):.4f}", f"{(time.perf_counter() - t0) * 1e3:.1f}"
            )
        manager.wait_until_finished()
        console.print(table)
        console.print(
            "save() returns once the previous background save is committed and this one's "
            "blocking part is done; writing and committing run in the background."
        )
        kept = manager.all_steps()
        console.print(f"committed steps kept (max_to_keep={max_to_keep}): {kept}")

    # A restarted job: a new manager finds the latest committed step and restores it.
    with ckpt.CheckpointManager(directory, max_to_keep=max_to_keep) as manager:
        latest = manager.latest_step()
        abstract = {
            "params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params),
            "step": 0,
            "loss": 0.0,
        }
        restored = manager.restore(latest, target=abstract)
    same = all(
        bool(jnp.array_equal(a, b))
        for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(params), strict=True)
    )
    if not same or restored["step"] != latest:
        raise SystemExit("demo: the restored checkpoint does not match what was saved")
    leaf = jax.tree.leaves(restored["params"])[0]
    console.print(
        f"restored step {latest} ({type(leaf).__name__} leaves, loss {restored['loss']:.4f}): "
        "identical to the trained parameters"
    )
    command = ls_command if ls_command is not None else f"ckpt ls {directory}"
    console.print(f"run [bold]{escape(command)}[/] to see the checkpoints")
