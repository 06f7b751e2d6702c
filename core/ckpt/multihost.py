"""Multi-host coordination through JAX's own distributed runtime.

When a job runs on several processes (``jax.distributed.initialize``), every process calls
the same ``save``/``restore``; ckpt then coordinates them through the coordination service
behind ``jax.distributed`` (never a device collective, never a protocol of its own):

- barriers: ``wait_at_barrier`` with a timeout; a process that dies or stalls makes every
  other one fail with :class:`TimeoutError` naming the barrier, the step and the directory;
- values one process hands the others (the temporary path, the outcome of a commit, a
  discovery listing, per-process manifests): the service's key-value store.

Keys and barrier ids are unique per operation: ``<prefix>ckpt/<operation number>/<name>``,
where the operation number counts the coordinated operations of this process (every process
makes the same calls in the same order, so the numbers agree) and ``prefix`` is the
optional namespace (``CKPT_MULTIHOST_PREFIX`` or the ``prefix`` argument) that keeps two
ckpt users of one job apart.

A single process (no ``jax.distributed``, or one process) gets :class:`SingleProcess`: no
barrier, no key-value traffic, nothing to initialise.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any

__all__ = [
    "Coordinator",
    "JaxCoordinator",
    "SingleProcess",
    "current",
]

#: Default limit of one barrier or key-value wait (seconds); ``CKPT_BARRIER_TIMEOUT_SECS``.
DEFAULT_TIMEOUT_SECS = 300.0
ENV_TIMEOUT = "CKPT_BARRIER_TIMEOUT_SECS"
ENV_PREFIX = "CKPT_MULTIHOST_PREFIX"


class Coordinator:
    """How the processes of one job agree (see the module docstring).

    Attributes:
        process_index: this process, ``0 <= process_index < process_count``.
        process_count: the number of processes.
        barriers: barriers this process has passed (counted for tests and docs).
    """

    process_index = 0
    process_count = 1

    def __init__(self) -> None:
        self.barriers = 0

    @property
    def is_primary(self) -> bool:
        """Whether this process creates temporaries, commits and lists (process 0)."""
        return self.process_index == 0

    @property
    def multiprocess(self) -> bool:
        return self.process_count > 1

    def operation(self, what: str, path: Any) -> Operation:
        """A new coordinated operation (``what`` on ``path``): its keys are unique."""
        return Operation(self, what, str(path))

    # -- primitives (overridden by JaxCoordinator) ---------------------------------------------
    def _barrier(self, key: str, timeout_secs: float) -> None:
        pass

    def _set(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def _get(self, key: str, timeout_secs: float) -> bytes:
        raise NotImplementedError


class SingleProcess(Coordinator):
    """One process: nothing to coordinate."""


class JaxCoordinator(Coordinator):
    """The coordination service of ``jax.distributed``.

    Args:
        client: the runtime's ``DistributedRuntimeClient`` (``wait_at_barrier``,
            ``key_value_set_bytes``, ``blocking_key_value_get_bytes``).
        process_index, process_count: this process and the number of processes.
        prefix: namespace of ckpt's keys (default ``$CKPT_MULTIHOST_PREFIX`` or empty).
        timeout_secs: limit of each barrier and wait (default ``$CKPT_BARRIER_TIMEOUT_SECS``
            or 300 s).
    """

    def __init__(
        self,
        client: Any,
        process_index: int,
        process_count: int,
        *,
        prefix: str | None = None,
        timeout_secs: float | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.process_index = process_index
        self.process_count = process_count
        self.prefix = prefix if prefix is not None else os.environ.get(ENV_PREFIX, "")
        self.timeout_secs = (
            float(timeout_secs)
            if timeout_secs is not None
            else float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_SECS))
        )
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def next_number(self) -> int:
        with self._lock:
            return next(self._numbers)

    def _barrier(self, key: str, timeout_secs: float) -> None:
        self.client.wait_at_barrier(key, max(1, int(timeout_secs * 1000)))

    def _set(self, key: str, value: bytes) -> None:
        self.client.key_value_set_bytes(key, value)

    def _get(self, key: str, timeout_secs: float) -> bytes:
        return bytes(
            self.client.blocking_key_value_get_bytes(key, max(1, int(timeout_secs * 1000)))
        )


class Operation:
    """One coordinated operation: its barriers and values share a unique key prefix."""

    def __init__(self, coordinator: Coordinator, what: str, path: str) -> None:
        self.coordinator = coordinator
        self.what = what
        self.path = path
        number = coordinator.next_number() if isinstance(coordinator, JaxCoordinator) else 0
        prefix = getattr(coordinator, "prefix", "")
        self.base = f"{prefix}ckpt/{number}/{what}"

    @property
    def timeout_secs(self) -> float:
        return float(getattr(self.coordinator, "timeout_secs", DEFAULT_TIMEOUT_SECS))

    def _timeout(self, kind: str, name: str, exc: BaseException) -> TimeoutError:
        c = self.coordinator
        return TimeoutError(
            f"ckpt {kind} '{self.base}/{name}' ({self.what} of {self.path}) timed out after "
            f"{self.timeout_secs:g} s in process {c.process_index} of {c.process_count}: "
            f"another process died, stalled or did not make the same call ({exc}). Nothing "
            f"was committed by this {self.what}. Raise {ENV_TIMEOUT} if saves legitimately "
            "take longer."
        )

    def barrier(self, name: str) -> None:
        """Wait until every process reaches barrier ``name`` of this operation."""
        c = self.coordinator
        if not c.multiprocess:
            return
        try:
            c._barrier(f"{self.base}/{name}", self.timeout_secs)
        except Exception as exc:
            raise self._timeout("barrier", name, exc) from exc
        c.barriers += 1

    def publish(self, name: str, value: bytes) -> None:
        """Hand ``value`` to the other processes under ``name`` (this process's copy)."""
        if self.coordinator.multiprocess:
            self.coordinator._set(f"{self.base}/{name}/{self.coordinator.process_index}", value)

    def receive(self, name: str, process: int = 0) -> bytes:
        """The value ``process`` published under ``name`` (waits for it)."""
        try:
            return self.coordinator._get(f"{self.base}/{name}/{process}", self.timeout_secs)
        except Exception as exc:
            raise self._timeout("wait for", name, exc) from exc

    def broadcast(self, name: str, value: bytes | None) -> bytes:
        """The primary's ``value`` on every process (``value`` is ignored elsewhere)."""
        if not self.coordinator.multiprocess:
            assert value is not None
            return value
        if self.coordinator.is_primary:
            assert value is not None
            self.publish(name, value)
            return value
        return self.receive(name, 0)

    def gather(self, name: str, value: bytes) -> list[bytes]:
        """On the primary: every process's ``value`` (in process order), after they have
        published it; elsewhere: ``[value]``. Publishes this process's value."""
        c = self.coordinator
        if not c.multiprocess:
            return [value]
        self.publish(name, value)
        if not c.is_primary:
            return [value]
        return [value if i == 0 else self.receive(name, i) for i in range(c.process_count)]


def current() -> Coordinator:
    """The coordinator of this process: :class:`JaxCoordinator` when ``jax.distributed`` is
    initialised with more than one process, else :class:`SingleProcess`. Cheap: no import of
    jax unless it is already imported."""
    import sys

    if "jax" not in sys.modules:
        return _SINGLE
    from jax._src import distributed

    state = distributed.global_state
    client = getattr(state, "client", None)
    count = getattr(state, "num_processes", 1) or 1
    if client is None or count <= 1:
        return _SINGLE
    key = (id(client), state.process_id)
    with _LOCK:
        found = _COORDINATORS.get(key)
        if found is None:
            found = _COORDINATORS[key] = JaxCoordinator(client, state.process_id, count)
        return found


_SINGLE = SingleProcess()
_LOCK = threading.Lock()
# One coordinator per runtime client, so that operation numbers count per process. This is
# part of the process-wide plugin-and-runtime state, like jax.distributed's own global_state.
_COORDINATORS: dict[tuple[int, int], JaxCoordinator] = {}
