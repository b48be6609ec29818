"""A sweep's workers as Ray actors: each builds its context (loads the model) once, then runs the units the
scheduler of :mod:`.workers` sends it. An actor that dies (its node lost, its process killed) is reported
as a dead worker: its unit runs again on another actor and a fresh actor takes its place."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from ...base.errors import HetMoEError
from .jobs import ContextFactory, JobRunner, Unit, worker_name
from .workers import QUIET_BARS, Event, SweepWorkerError


class SweepActor:
    """The actor class (made remote by :class:`RayPool`). The context is built in :meth:`ready`, not in the
    constructor, so that a bad input reaches the driver as the one-line error it is."""

    def __init__(self, factory: ContextFactory, kind: str, threads: int, device: str | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.factory, self.name, self.device = factory, worker_name(kind), device
        self.runner: JobRunner | None = None

    def ready(self) -> dict:
        if self.runner is None:
            self.runner = JobRunner(self.factory(self.device), self.name)
        return {"name": self.name, "pid": os.getpid(), "identity": self.runner.ctx.identity}

    def run(self, unit: Unit) -> dict:
        assert self.runner is not None
        return self.runner.run(unit)


class RayPool:
    """``size`` actors on the Ray cluster at ``address`` (None: a local one, started here and stopped at
    :meth:`close`; ``size`` None: :func:`cluster_workers`), each reserving ``threads`` CPUs (its intra-op threads)
    and ``gpus`` GPUs (None: one if the cluster has GPUs, else none). With a GPU, Ray gives each actor its own
    device and the actor's model goes to ``cuda``. Ray is reached at :meth:`open`, when there are units to run."""

    def __init__(
        self,
        factory: ContextFactory,
        size: int | None = None,
        address: str | None = None,
        threads: int = 1,
        gpus: float | None = 0,
    ) -> None:
        self.factory, self.address, self.threads, self.gpus = factory, address, threads, gpus
        self.size = size or 0
        self._wanted = size
        self._owns = False
        self._actors: dict[int, Any] = {}
        self._refs: dict[Any, tuple[int, str, str]] = {}  # in flight: ref -> (worker, "ready" | "run", unit key)

    def open(self) -> None:
        try:
            import ray
        except ImportError:
            raise HetMoEError(
                "--ray needs Ray: pip install 'hetmoe-compile[ray]' (or ray), or run with --workers N on this machine"
            ) from None
        self._ray = ray
        if not ray.is_initialized():
            check_reachable(self.address)
            try:
                ray.init(
                    address=self.address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
                )
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = f"at {self.address}" if self.address else "on this machine"
                raise HetMoEError(
                    f"--ray: cannot reach a Ray cluster {where} ({str(exc).splitlines()[0]}); start one with "
                    "'ray start --head' or give its address"
                ) from None
            self._owns = True
        resources = ray.cluster_resources()
        if self.gpus is None:
            self.gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        self.size = self._wanted or cluster_workers(resources, self.gpus > 0)
        remote = ray.remote(
            num_cpus=self.threads,
            num_gpus=self.gpus,
            max_restarts=0,
            max_task_retries=0,
            runtime_env={"env_vars": QUIET_BARS},
        )
        self._cls: Any = remote(SweepActor)

    def start(self, index: int) -> None:
        actor = self._cls.remote(self.factory, f"ray{index}", self.threads, "cuda" if self.gpus else None)
        self._actors[index] = actor
        self._refs[actor.ready.remote()] = (index, "ready", "")

    def submit(self, index: int, unit: Unit) -> None:
        self._refs[self._actors[index].run.remote(unit)] = (index, "run", unit.key)

    def events(self, timeout: float) -> list[Event]:
        ray = self._ray
        if not self._refs:
            return []
        done, _ = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        out: list[Event] = []
        for ref in done:
            i, what, key = self._refs.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                for other in [r for r, v in self._refs.items() if v[0] == i]:
                    self._refs.pop(other)
                self._actors.pop(i, None)
                out.append(("died", i, f"died ({str(exc).splitlines()[0][:160]})"))
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, HetMoEError):
                    if what == "ready":
                        raise HetMoEError(str(cause)) from None
                    out.append(("failed", i, key, str(cause)))
                elif what == "ready":
                    raise SweepWorkerError(f"sweep: Ray worker ray{i} could not start:\n{exc}") from None
                else:
                    out.append(("crashed", i, key, str(exc)))
            else:
                out.append(("ready", i, value) if what == "ready" else ("done", i, key, value))
        return out

    def close(self) -> None:
        for actor in self._actors.values():
            self._ray.kill(actor, no_restart=True)
        self._actors.clear()
        self._refs.clear()
        if self._owns:
            self._ray.shutdown()
            self._owns = False


def cluster_workers(resources: dict, gpu: bool) -> int:
    """The default number of actors: one per GPU of the cluster for a CUDA sweep, else one per 2 CPUs."""
    if gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise HetMoEError("--ray: the cluster has no GPU for a CUDA sweep; use --device cpu or add GPU nodes")
        return gpus
    return max(1, int(resources.get("CPU", 1)) // 2)


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Refuse in one line, within ``timeout`` seconds, a ``host:port`` (or ``ray://host:port``) where nothing
    answers: Ray itself retries such an address for minutes. ``None`` and ``auto`` are left to Ray."""
    if not address or address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise HetMoEError(
            f"--ray {address}: nothing answers there ({reason}); start the cluster with 'ray start --head' and give "
            "its address, or leave ADDRESS out for a local Ray instance"
        ) from None
