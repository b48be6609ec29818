"""Running a sweep's units: in this process, on local worker processes, or on Ray actors (:mod:`.ray_actors`).

Each worker builds its own :class:`~.jobs.SweepContext` once (one model copy) and then takes units one at a
time. The scheduler hands a free worker the next instance of the job it holds (no recompilation), else a job no
other worker holds. A worker that dies (killed, out of memory) has its unit handed to another worker and is
replaced; each finished unit is recorded once, by the scheduler, as it arrives."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from tqdm.auto import tqdm

from ...base.errors import HetMoEError
from .jobs import ContextFactory, JobRunner, SweepContext, Unit, binding, worker_name
from .store import SweepStore

MAX_ATTEMPTS = 3  # a unit whose worker died this many times fails the sweep
Event = tuple  # ("ready", worker, info) | ("started", worker, key) | ("done", worker, key, result)
# | ("died", worker, reason) | ("failed", worker, key, message) | ("crashed", worker, key, traceback)


class SweepWorkerError(RuntimeError):
    """A worker raised an unexpected exception (a bug): its traceback, as text."""


class Pool(Protocol):
    """Workers that build a context and run units; events report what happened since the last call."""

    size: int  # known after open()

    def open(self) -> None: ...

    def start(self, index: int) -> None: ...

    def submit(self, index: int, unit: Unit) -> None: ...

    def events(self, timeout: float) -> list[Event]: ...

    def close(self) -> None: ...


@dataclass
class Observer:
    """Optional callbacks on the scheduler's events: a worker ``ready`` (its info: name, pid, identity), a unit
    ``assigned`` to it and, where the pool reports it, ``started`` by it (worker index, info, unit)."""

    ready: Callable[[int, dict], None] | None = None
    assigned: Callable[[int, dict, Unit], None] | None = None
    started: Callable[[int, dict, Unit], None] | None = None


@dataclass
class Ran:
    """What :func:`run_units` ran now: how many units, the identity its workers reported (None if none
    started), and each worker that became ready: its name and the seconds from its start to ready (loading the
    model and what the context needs)."""

    count: int = 0
    identity: dict | None = None
    workers: list[dict] = field(default_factory=list)


def run_units(
    units: list[Unit],
    store: SweepStore | None,
    finished: dict[str, dict],
    run_serial: Callable[[], JobRunner] | None = None,
    pool: Pool | None = None,
    observer: Observer | None = None,
) -> tuple[dict[str, dict], Ran]:
    """Results of every unit by key: ``finished`` ones as given, the others run by ``run_serial()``'s runner in this
    process or on ``pool``, each saved to ``store`` as it finishes. One progress bar over all units."""
    results = {u.key: finished[u.key] for u in units if _matches(finished.get(u.key), u)}
    todo = [u for u in units if u.key not in results]
    ran = Ran(len(todo))
    if not todo:
        return results, ran
    if pool is not None:
        pool.open()  # a cluster that cannot be reached fails here, before the bar
    bar = tqdm(total=len(units), initial=len(results), desc="sweep", unit="job", dynamic_ncols=True)
    try:
        if pool is None:
            assert run_serial is not None
            runner = run_serial()
            try:
                for unit in todo:
                    bar.set_postfix_str(unit.job.label, refresh=False)
                    _record(store, unit, runner.run(unit), results, bar)
            finally:
                runner.close()
        else:
            _schedule(pool, todo, store, results, bar, observer or Observer(), ran)
        return results, ran
    finally:
        bar.close()


def _matches(result: dict | None, unit: Unit) -> bool:
    return result is not None and result.get("label") == unit.job.label and result.get("seed") == unit.seed


def _record(store: SweepStore | None, unit: Unit, result: dict, results: dict, bar) -> None:
    if store is not None:
        store.save(unit, result)
    results[unit.key] = result
    bar.update(1)


def _schedule(pool: Pool, todo: list[Unit], store, results: dict, bar, observer: Observer, ran: Ran) -> None:
    """Run ``todo`` on ``pool`` (opened); ``ran`` gets the identity the workers reported (all of them the same)
    and their start-up times."""
    identity: dict | None = None
    started: dict[int, float] = {}
    pending = deque(todo)
    by_key = {u.key: u for u in todo}
    busy: dict[int, Unit] = {}  # worker -> its unit
    holds: dict[int, Any] = {}  # worker -> the job it compiled last
    info: dict[int, dict] = {}
    idle: set[int] = set()
    attempts: dict[str, int] = {}
    restarts = 0
    try:
        for i in range(pool.size):
            started[i] = time.perf_counter()
            pool.start(i)
        while pending or busy:
            for event in pool.events(timeout=1.0):
                kind, i = event[0], event[1]
                if kind == "ready":
                    info[i] = event[2]
                    ran.workers.append({"name": info[i]["name"], "ready_s": round(time.perf_counter() - started[i], 2)})
                    if identity is None:
                        identity = ran.identity = event[2]["identity"]
                        if store is not None:
                            store.bind_model(identity)
                    elif binding(event[2]["identity"]) != binding(identity):
                        raise HetMoEError(
                            f"sweep: worker {event[2]['name']} has another model or input ranges than the first "
                            "worker; give every worker the same model files, and calibrated ranges as --input-ranges "
                            "FILE (from calibrate-ranges)"
                        )
                    if observer.ready:
                        observer.ready(i, event[2])
                    idle.add(i)
                elif kind == "started":
                    if observer.started and i in busy:
                        observer.started(i, info[i], busy[i])
                elif kind == "done":
                    unit = busy.pop(i)
                    _record(store, unit, event[3], results, bar)
                    idle.add(i)
                elif kind == "died":
                    idle.discard(i)
                    holds.pop(i, None)
                    lost = busy.pop(i, None)
                    where = f"worker {info.get(i, {}).get('name', i)} {event[2]}"
                    if lost is not None:
                        attempts[lost.key] = attempts.get(lost.key, 0) + 1
                        if attempts[lost.key] >= MAX_ATTEMPTS:
                            raise HetMoEError(
                                f"sweep: '{lost.job.label}' (instance {lost.seed}) lost its worker {MAX_ATTEMPTS} "
                                f"times (last: {where}); check the workers' memory, or run it with --workers 1"
                            )
                        pending.appendleft(lost)
                        tqdm.write(
                            f"sweep: {where}; '{lost.job.label}' (instance {lost.seed}) runs again", file=sys.stderr
                        )
                    else:
                        tqdm.write(f"sweep: {where}", file=sys.stderr)
                    restarts += 1
                    if restarts > 2 * pool.size + MAX_ATTEMPTS:
                        raise HetMoEError(
                            f"sweep: workers keep dying (last: {where}); each holds one model copy: check memory, "
                            "or use fewer --workers"
                        )
                    info.pop(i, None)
                    started[i] = time.perf_counter()
                    pool.start(i)  # a fresh worker in its place
                elif kind == "failed":
                    raise HetMoEError(event[3])
                elif kind == "crashed":
                    unit = by_key[event[2]]
                    raise SweepWorkerError(
                        f"sweep: '{unit.job.label}' (instance {unit.seed}) raised in worker "
                        f"{info.get(i, {}).get('name', i)}:\n{event[3]}"
                    )
            for i in sorted(idle):
                if not pending:
                    break
                unit = _next_for(pending, holds.get(i), set(holds.values()))
                idle.discard(i)
                busy[i], holds[i] = unit, unit.job
                pool.submit(i, unit)
                if observer.assigned:
                    observer.assigned(i, info[i], unit)
            bar.set_postfix_str(f"{len(busy)} of {pool.size} workers busy", refresh=False)
    finally:
        pool.close()


def _next_for(pending: deque, held, taken: set) -> Unit:
    """The next unit for a worker: another instance of the job it holds, else a job no worker holds, else the
    first pending."""
    pick = next((u for u in pending if u.job == held), None)
    if pick is None:
        pick = next((u for u in pending if u.job not in taken), pending[0])
    pending.remove(pick)
    return pick


def worker_loop(ctx: SweepContext, name: str, receive: Callable[[], Any], send: Callable[[tuple], None]) -> None:
    """A worker's life after its context is built: report ready, then run the units it receives until ``None``."""
    send(("ready", {"name": name, "pid": os.getpid(), "identity": ctx.identity}))
    runner = JobRunner(ctx, name)
    while True:
        unit = receive()
        if unit is None:
            return
        send(("started", unit.key))
        try:
            send(("done", unit.key, runner.run(unit)))
        except HetMoEError as exc:
            send(("failed", unit.key, str(exc)))
        except Exception:
            send(("crashed", unit.key, traceback.format_exc()))


QUIET_BARS = {"TQDM_DISABLE": "1"}
"""The environment of a worker: one progress bar for the sweep, the scheduler's (tqdm reads it on import)."""


@contextmanager
def quiet_bars() -> Iterator[None]:
    """:data:`QUIET_BARS` in this process's environment for as long as it takes to start a worker."""
    saved = {k: os.environ.get(k) for k in QUIET_BARS}
    os.environ.update(QUIET_BARS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _local_worker(conn, factory: ContextFactory, kind: str, threads: int, device: str | None) -> None:
    """Entry point of a local worker process (spawned): its share of the threads, one context, then
    :func:`worker_loop` over its pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the sweep through the scheduler
    import torch

    if threads:
        torch.set_num_threads(threads)
    name = worker_name(kind)
    try:
        ctx = factory(device)
    except HetMoEError as exc:
        conn.send(("failed", "", str(exc)))
        return
    except Exception:
        conn.send(("crashed", "", traceback.format_exc()))
        return
    try:
        worker_loop(ctx, name, conn.recv, conn.send)
    except (EOFError, BrokenPipeError):  # the scheduler is gone
        pass


class LocalPool:
    """``size`` worker processes on this machine (spawned, so CUDA and threads start clean), each with
    ``threads`` intra-op threads (0: torch's default) and, when ``devices`` are given, worker i on
    ``devices[i % len(devices)]``."""

    def __init__(self, factory: ContextFactory, size: int, threads: int = 0, devices: list[str] | None = None):
        import multiprocessing

        self.size, self.factory, self.threads, self.devices = size, factory, threads, devices or []
        self._mp = multiprocessing.get_context("spawn")
        self._procs: dict[int, Any] = {}
        self._conns: dict[int, Any] = {}

    def open(self) -> None:
        pass

    def start(self, index: int) -> None:
        parent, child = self._mp.Pipe()
        device = self.devices[index % len(self.devices)] if self.devices else None
        proc = self._mp.Process(
            target=_local_worker,
            args=(child, self.factory, f"local{index}", self.threads, device),
            daemon=True,
            name=f"hetmoe-sweep-{index}",
        )
        with quiet_bars():  # the child reads it when it imports tqdm, before this function runs
            proc.start()
        child.close()
        self._procs[index], self._conns[index] = proc, parent

    def submit(self, index: int, unit: Unit) -> None:
        self._conns[index].send(unit)

    def events(self, timeout: float) -> list[Event]:
        index_of = {id(c): i for i, c in self._conns.items()}
        sentinels = {p.sentinel: i for i, p in self._procs.items()}
        out: list[Event] = []
        dead: set[int] = set()
        for obj in wait([*self._conns.values(), *sentinels], timeout):
            if isinstance(obj, int):
                dead.add(sentinels[obj])
                continue
            assert isinstance(obj, Connection)
            i = index_of[id(obj)]
            try:
                while obj.poll():
                    message = obj.recv()
                    if message[0] == "failed" and not message[1]:  # while building its context
                        raise HetMoEError(message[2])
                    if message[0] == "crashed" and not message[1]:
                        raise SweepWorkerError(f"sweep: worker local{i} could not start:\n{message[2]}")
                    out.append((message[0], i, *message[1:]))
            except (EOFError, ConnectionResetError):
                dead.add(i)
        for i in dead:
            proc = self._procs.pop(i)
            self._conns.pop(i).close()
            proc.join(timeout=5)
            code = proc.exitcode
            reason = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
            out.append(("died", i, reason))
        return out

    def close(self) -> None:
        for conn in self._conns.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs.values():  # idle workers exit at once; busy ones (an error, Ctrl-C) are stopped
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns.values():
            conn.close()
        self._procs.clear()
        self._conns.clear()
