"""Feed jobs to workers and write what comes back: one local worker (default) or Ray actors.

The driver (this process) reads each item's files, hands the job to a worker and writes every result the
moment it arrives: the image first, then its row, appended to ``results.jsonl`` and flushed to disk. A row
present means a finished (item, method); re-running skips those. With Ray: one actor per GPU (or N one-thread
CPU actors), models loaded once per actor, at most ``DEPTH`` jobs queued per actor (the next one is waiting when
an actor finishes, and no more is sent), and an actor that dies loses nothing: the job it was running goes
back to the queue for whichever actor is free next (up to ``max_attempts`` runs of that job), jobs only queued
behind it go back unchanged, and a fresh actor takes the dead one's place.
"""
from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import os
import re
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from .data import Item, Job, make_job
from .worker import Config, Worker

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
IMAGES = "images"
DEPTH = 2  # jobs queued per Ray actor: the one it runs and the next
CRASH_ENV = "BLENDED_DIFFUSION_BENCH_CRASH"  # test hook: ids whose first run kills its Ray worker process
PACK_ROOT = Path(__file__).resolve().parents[2]
RAY_REQUIREMENT = 'pip install "blended-diffusion[ray]" (or: pip install "ray>=2.9")'


# --- output ---------------------------------------------------------------------------------------------------
def file_stem(item_id: str) -> str:
    """An id as a file name: kept when it is one, else made safe and suffixed with a hash of the id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._") or "item"
    return safe if safe == item_id else f"{safe}-{zlib.crc32(item_id.encode()):08x}"


def _json_value(v):
    if isinstance(v, float) and math.isnan(v):
        return None  # PIE-Bench's "nan": the image has no such part
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    return v


class Output:
    """The output folder: results.jsonl (append-only) and images/<method>/<id>.png."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        self.path = self.dir / RESULTS

    def rows(self) -> list[dict]:
        """Every row written so far, in order (a line cut short by a crash is skipped with a warning)."""
        if not self.path.is_file():
            return []
        rows = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(row if isinstance(row, dict) else {})
            except json.JSONDecodeError:
                log.warning("%s:%d is not a complete row (a run stopped while writing it?): ignored", self.path, n)
        return [r for r in rows if "id" in r and "method" in r]

    def finished(self) -> set[tuple[str, str]]:
        """(id, method) of every row without an error."""
        return {(r["id"], r["method"]) for r in self.rows() if r.get("error") is None}

    def write(self, result: dict, worker: str) -> dict:
        row = dict(result["row"])
        row["worker"] = f"{worker} ({row.get('worker')})" if row.get("worker") else worker
        if result.get("image") is not None:
            from PIL import Image
            rel = Path(IMAGES) / row["method"] / f"{file_stem(row['id'])}.png"
            dest = self.dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            Image.fromarray(np.asarray(result["image"], dtype=np.uint8)).save(tmp, format="PNG")
            os.replace(tmp, dest)
            row["image"] = rel.as_posix()
        else:
            row["image"] = None
        row["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        row = _json_value(row)
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                f.write(b"\n")  # a line cut short by a crash stays on its own line (rows() skips it)
            f.write((json.dumps(row) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        if row.get("error"):
            log.warning("item %s, %s: %s", row["id"], row["method"], row["error"])
        return row


# --- runners --------------------------------------------------------------------------------------------------
def run_local(work: list[tuple[Item, list[str]]], config: Config, out: Output, progress=None,
              threads: int | None = None) -> None:
    """Every job in this process, one after the other, with one worker (models loaded at the first job)."""
    import torch
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        worker = Worker(config)
        for item, methods in work:
            for result in worker.run(make_job(item, methods)):
                out.write(result, "local")
            if progress is not None:
                progress.update()
    finally:
        torch.set_num_threads(old)


def import_ray():
    """Ray, or a CLI error saying how to install it (checked before any work)."""
    try:
        import ray
    except ImportError:
        from .. import CLIError
        raise CLIError(f"--ray needs Ray, which is not installed: {RAY_REQUIREMENT}") from None
    return ray


class _Actor:
    """A Ray actor around one Worker; its models are loaded when it starts."""

    def __init__(self, config: Config, threads: int | None):
        import torch
        if threads:
            torch.set_num_threads(threads)
        self.worker = Worker(config).load()

    def run(self, job: Job) -> list[dict]:
        return self.worker.run(job)


class _Slot:
    def __init__(self, number: int):
        self.number, self.actor, self.refs = number, None, []


def _init_ray(ray, address: str, cpus: int | None, verbose: bool) -> bool:
    """Connect to (or start) Ray with the workers' setup hook; True when this call started it."""
    from ray import cloudpickle

    from .. import CLIError
    from . import bootstrap
    if ray.is_initialized():
        return False
    cloudpickle.register_pickle_by_value(sys.modules[bootstrap.__name__])  # no pack import needed to load it
    env = {k: v for k, v in os.environ.items() if k.startswith("BLENDED_DIFFUSION_") and k != CRASH_ENV}
    kwargs = {"runtime_env": {"worker_process_setup_hook": bootstrap.hook(str(PACK_ROOT)), "env_vars": env},
              "include_dashboard": False, "log_to_driver": verbose, "logging_level": logging.WARNING}
    if address == "local" and cpus:
        kwargs["num_cpus"] = cpus
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise CLIError(f"--ray {address}: {e} (start one with `ray start --head`, or use --ray local)") from None
    return True


class _RayRun:
    """The driver's loop over Ray actors (see the module docstring): slots of actors, each with at most DEPTH jobs
    in flight; a dead actor's running job retried (up to ``max_attempts`` runs) and the actor replaced."""

    def __init__(self, ray, work, config: Config, out: Output, *, address: str, cpus: int | None,
                 max_attempts: int, progress, threads: int | None):
        from .. import CLIError
        self.ray, self.config, self.out, self.progress = ray, config, out, progress
        self.max_attempts = max_attempts
        self.crash = {s.strip() for s in os.environ.get(CRASH_ENV, "").split(",") if s.strip()}
        self.stats = {"actors": 0, "worker_deaths": 0, "retries": 0}
        if cpus:
            n, self.options = cpus, {"num_cpus": 1, "num_gpus": 0}
            self.cfg, self.threads = replace(config, device="cpu"), threads or 1
        else:
            n = int(ray.cluster_resources().get("GPU", 0))
            if n == 0:
                raise CLIError(f"--ray {address}: the cluster has no GPU; give --ray-cpus N for N CPU workers "
                               "(one thread each)")
            self.options, self.threads = {"num_cpus": 1, "num_gpus": 1}, threads
            self.cfg = replace(config, device="cuda", gpu_id=0)
        self.actor_cls = ray.remote(_Actor)
        self.slots = [_Slot(i + 1) for i in range(n)]
        self.max_starts = n + 2 * n * max_attempts + 10
        self.items = iter(work)
        self.pending: collections.deque[Job] = collections.deque()
        self.inflight: dict = {}
        log.info("Ray: %d %s worker(s)", n, "CPU" if cpus else "GPU")

    def start(self, slot: _Slot) -> None:
        slot.actor = self.actor_cls.options(**self.options).remote(self.cfg, self.threads)
        self.stats["actors"] += 1

    def deliver(self, results: list[dict], slot: _Slot | None) -> None:
        for result in results:
            self.out.write(result, "driver" if slot is None else f"ray worker {slot.number}")
        if self.progress is not None:
            self.progress.update()

    def task_error(self, job: Job, e: Exception) -> list[dict]:
        """Rows for an error outside the per-method handling (not retried)."""
        return Worker(self.config).run(replace(job, error=f"worker error: {str(e).strip().splitlines()[-1][:300]}"))

    def next_job(self) -> Job | None:
        if self.pending:
            return self.pending.popleft()
        for item, methods in self.items:
            job = make_job(item, methods)
            if job.error is None:
                return job
            self.deliver(Worker(self.config).run(job), None)  # an unreadable item: recorded here, nothing to run
        return None

    def fill(self) -> None:
        """Keep every actor busy, DEPTH jobs at most."""
        for s in self.slots:
            while len(s.refs) < DEPTH:
                job = self.next_job()
                if job is None:
                    break
                job.crash = job.item.id in self.crash and job.attempt == 0
                ref = s.actor.run.remote(job)
                s.refs.append(ref)
                self.inflight[ref] = (s, job)

    def on_death(self, slot: _Slot, e: Exception) -> None:
        """An actor died: its finished jobs kept, the running one retried (or recorded as failed), the queued
        ones back in the queue unchanged, and a fresh actor in its place."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

        from .. import CLIError
        if "creation task" in str(e):
            cause = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(e).split()))[:400]
            raise CLIError(f"a Ray worker could not start (importing the pack or loading its models): "
                           f"{cause}") from None
        self.stats["worker_deaths"] += 1
        lost = []
        for r in slot.refs:  # in submission order; a job that finished before the death is kept
            j = self.inflight.pop(r)[1]
            try:
                self.deliver(self.ray.get(r, timeout=0), slot)
            except (RayActorError, WorkerCrashedError, GetTimeoutError):
                lost.append(j)
            except RayTaskError as te:
                self.deliver(self.task_error(j, te), slot)
        slot.refs = []
        running, queued = lost[0], lost[1:]  # the first unfinished job was running, the rest waited
        running.attempt += 1
        log.warning("Ray worker %d died while running item %s (run %d of at most %d): %s", slot.number,
                    running.item.id, running.attempt, self.max_attempts, type(e).__name__)
        self.pending.extendleft(reversed(queued))
        if running.attempt >= self.max_attempts:
            err = (f"the worker process died {running.attempt} times while running this item "
                   f"({type(e).__name__})")
            self.deliver(Worker(self.config).run(replace(running, error=err, crash=False, attempt=running.attempt - 1)),
                         None)
        else:
            self.stats["retries"] += 1
            self.pending.appendleft(running)  # next, on whichever worker is free first
        if self.stats["actors"] >= self.max_starts:
            raise CLIError(f"Ray workers died {self.stats['worker_deaths']} times; stopping (finished rows "
                           f"are in {self.out.path})")
        self.start(slot)

    def run(self) -> dict:
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
        for s in self.slots:
            self.start(s)
        while True:
            self.fill()
            if not self.inflight:
                return self.stats
            (ref,), _ = self.ray.wait(list(self.inflight), num_returns=1)
            slot, job = self.inflight[ref]
            try:
                results = self.ray.get(ref)
            except (RayActorError, WorkerCrashedError) as e:
                self.on_death(slot, e)
                continue
            except RayTaskError as e:
                results = self.task_error(job, e)
            self.inflight.pop(ref)
            slot.refs.remove(ref)
            self.deliver(results, slot)

    def close(self) -> None:
        for s in self.slots:
            if s.actor is not None:
                try:
                    self.ray.kill(s.actor)
                except Exception:  # already gone
                    pass


def run_ray(work: list[tuple[Item, list[str]]], config: Config, out: Output, *, address: str,
            cpus: int | None = None, max_attempts: int = 3, progress=None, verbose: bool = False,
            threads: int | None = None) -> dict:
    """Every job on Ray actors (see the module docstring). ``address``: "auto" (a running cluster), "local" (a
    new one in this machine) or a cluster address. Returns counts: actors started, worker deaths, retries."""
    ray = import_ray()
    started = _init_ray(ray, address, cpus, verbose)
    pool = None
    try:
        pool = _RayRun(ray, work, config, out, address=address, cpus=cpus, max_attempts=max_attempts,
                       progress=progress, threads=threads)
        return pool.run()
    finally:
        if pool is not None:
            pool.close()
        if started:
            ray.shutdown()
