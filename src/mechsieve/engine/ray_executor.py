"""The Ray executor: the pool as a Ray dataset (one block per shard), `map_batches` over an actor
pool holding one model per actor, finished shards streamed back to the driver.

Only this module imports ray, and only when a Ray run starts (`pip install 'mechsieve[ray]'`).
The driver writes every shard it receives (store: shards.ShardStore), so workers need no shared
file system; they do need mechsieve installed and the model reachable under the same name (a
folder on every node, or a hub id).

Every actor signs in with a resource-free registry actor as it starts, and the driver kills
them all however a run ends (finished, a failing shard, Ctrl-C): Ray Data only drops its handles
to them, and an actor still inside a shard, or kept by its outputs' lineage, would go on holding
its CPUs and GPUs, so the next run in a long-lived Ray session waited for them forever.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import numpy as np

from mechsieve.engine.base import (
    EngineError,
    Executor,
    OnShardDone,
    Shard,
    ShardError,
    ShardOutput,
    Step,
)

INSTALL = "pip install 'mechsieve[ray]' (in a checkout: make ray)"
_FAILED = re.compile(r"(shard (\d+) \(examples [^\n]*? failed: [^\n]*)")


def require_ray() -> Any:
    """The `ray` module, or an EngineError with the install command."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise EngineError(f"engine.executor=ray needs Ray Data, which is not installed: {INSTALL}") from err
    return ray


def pack(output: ShardOutput) -> tuple[bytes, str]:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in output.arrays.items()}), json.dumps(output.meta)


def unpack(arrays: bytes, meta: str) -> ShardOutput:
    from safetensors.numpy import load

    return ShardOutput(load(arrays), json.loads(meta))


def shard_tables(shards: list[Shard]) -> list[Any]:
    """One Arrow table per shard (rows: its examples as JSON), so one block is one shard. A
    streamed pool's shard is one row holding its pickled reader (data.stream.ShardReader: ids and
    where its records are), so the actor reads its own examples and the driver ships none."""
    import pickle

    import pyarrow as pa

    tables = []
    for s in shards:
        if s.reader is not None:
            tables.append(pa.table({
                "shard": pa.array([s.index], pa.int64()), "start": pa.array([s.start], pa.int64()),
                "size": pa.array([1], pa.int64()), "reader": pa.array([pickle.dumps(s.reader)], pa.binary()),
            }))
            continue
        m = len(s.examples)
        tables.append(pa.table({
            "shard": pa.array([s.index] * m, pa.int64()),
            "start": pa.array([s.start] * m, pa.int64()),
            "size": pa.array([m] * m, pa.int64()),
            "example": pa.array([json.dumps(ex.to_json(), default=str) for ex in s.examples], pa.string()),
        }))
    return tables


class ActorRegistry:
    """A Ray actor (no CPUs) that holds a handle to every ShardWorker of one run, so the driver
    can kill them all when the run ends (see the module docstring)."""

    def __init__(self) -> None:
        self.actors: list[Any] = []

    def add(self, actor: Any) -> None:
        self.actors.append(actor)

    def all(self) -> list[Any]:
        return self.actors


def kill_actors(ray: Any, registry: Any) -> None:
    """Kill every actor signed in with `registry`, then the registry (their CPUs and GPUs are free
    a moment later)."""
    try:
        actors = ray.get(registry.all.remote(), timeout=60)
    except Exception:  # a cluster gone already holds no actors of ours
        actors = []
    for actor in [*actors, registry]:
        try:
            ray.kill(actor)
        except Exception:
            pass


class ShardWorker:
    """A Ray actor: sets the step up once (loads the model), then runs it on each shard it gets."""

    def __init__(self, step: Step, threads: int, registry: Any = None) -> None:
        start = time.perf_counter()
        if registry is not None:  # first, so that a run stopped while actors load still kills them
            import ray

            ray.get(registry.add.remote(ray.get_runtime_context().current_actor))
        import torch

        torch.set_num_threads(max(1, threads))
        self.step = step
        self.step.setup()
        self.setup_seconds = time.perf_counter() - start  # reported with the actor's first shard

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mechsieve.data.records import Example

        index = int(batch["shard"][0])
        if len(set(batch["shard"].tolist())) != 1 or len(batch["shard"]) != int(batch["size"][0]):
            raise RuntimeError(f"shard {index} (examples ?) failed: it reached the worker in pieces "
                               f"({len(batch['shard'])} of {int(batch['size'][0])} rows); an engine bug, please report")
        start = time.perf_counter()
        if "reader" in batch:  # a streamed pool's shard: read its records here
            import pickle

            shard = Shard(index, int(batch["start"][0]), [], pickle.loads(batch["reader"][0]))
        else:
            shard = Shard(index, int(batch["start"][0]), [Example(**json.loads(text)) for text in batch["example"]])
        try:
            output = self.step.run(shard.load())
        except Exception as err:
            raise RuntimeError(f"{shard.describe()} failed: {type(err).__name__}: {err}") from err
        seconds = time.perf_counter() - start
        arrays, meta = pack(output)
        setup, self.setup_seconds = self.setup_seconds, 0.0
        return {"shard": np.array([index], dtype=np.int64), "arrays": np.array([arrays], dtype=object),
                "meta": np.array([meta], dtype=object), "seconds": np.array([seconds], dtype=np.float64),
                "setup": np.array([setup], dtype=np.float64), "actor": np.array([os.getpid()], dtype=np.int64)}


class RayExecutor(Executor):
    """Runs a step on a Ray actor pool (see the module docstring)."""

    name = "ray"

    def __init__(self, address: str = "", actors: int = 1, gpus_per_actor: float = 0.0,
                 cpus_per_actor: float = 1.0) -> None:
        self.address = address
        self.actors = actors
        self.gpus_per_actor = gpus_per_actor
        self.cpus_per_actor = cpus_per_actor
        self.timings: dict[str, float] = {}
        self.actors_used = 0

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "address": self.address or "local", "actors": self.actors,
                "gpus_per_actor": self.gpus_per_actor, "cpus_per_actor": self.cpus_per_actor}

    def connect(self) -> bool:
        """Join or start Ray; True when this call started it (and so shuts it down after)."""
        ray = require_ray()
        if ray.is_initialized():
            return False
        import logging

        start = time.perf_counter()
        try:
            ray.init(address=self.address or None, include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise EngineError(f"could not reach a Ray cluster at engine.ray_address={self.address!r}: {err}. "
                              "Start one with `ray start --head`, or leave the address empty to start Ray "
                              "on this machine") from err
        self.timings["ray_start"] = time.perf_counter() - start
        return True

    def check_resources(self, resources: dict[str, float], size: int) -> None:
        """Refuse an actor pool a Ray instance on this machine cannot hold (Ray would wait for it
        forever); a cluster at an address may scale up, so there it is only a warning."""
        need = {"CPU": size * self.cpus_per_actor, "GPU": size * self.gpus_per_actor}
        for kind, amount in need.items():
            have = resources.get(kind, 0.0)
            if amount > have:
                per = "cpus_per_actor" if kind == "CPU" else "gpus_per_actor"
                message = (f"{size} actors x engine.{per}={getattr(self, per)} need {amount:g} {kind}s, but the "
                           f"Ray cluster has {have:g}; lower engine.actors (--actors) or engine.{per}, or add nodes")
                if not self.address:
                    raise EngineError(message)
                import warnings

                warnings.warn(message + " (waiting for the cluster to scale up)", stacklevel=2)

    def execute(self, step: Step, shards: list[Shard], on_done: OnShardDone, progress: bool = True) -> None:
        if not shards:
            return
        import logging

        from tqdm.auto import tqdm

        ray = require_ray()
        started = self.connect()
        # our own bar over examples instead of Ray Data's per-operator bars and INFO lines
        # (the context is the process's: what it held is put back in `finally`)
        ctx = ray.data.DataContext.get_current()
        quiet = {key: getattr(ctx, key) for key in ("enable_progress_bars", "print_on_execution_start")
                 if hasattr(ctx, key)}
        for key in quiet:
            setattr(ctx, key, False)
        data_log = logging.getLogger("ray.data")
        level = data_log.level
        data_log.setLevel(logging.ERROR)
        bar = tqdm(total=sum(s.size for s in shards), unit="ex", desc=f"{step.name}: ray shards",
                   disable=not progress, leave=False)
        by_index = {s.index: s for s in shards}
        size = min(self.actors, len(shards))
        registry = rows = None
        try:
            self.check_resources(ray.cluster_resources(), size)
            registry = ray.remote(num_cpus=0)(ActorRegistry).remote()
            ds = ray.data.from_arrow(shard_tables(shards))
            out = ds.map_batches(ShardWorker, fn_constructor_args=(step, int(self.cpus_per_actor), registry),
                                 batch_size=None, batch_format="numpy",
                                 compute=ray.data.ActorPoolStrategy(size=size),
                                 num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor or None)
            start = time.perf_counter()
            busy: dict[int, list[float]] = {}  # per actor: [set-up (imports, model load), shard compute]
            rows = iter(out.iter_rows())
            for row in rows:
                k = int(row["shard"])
                seconds = busy.setdefault(int(row["actor"]), [0.0, 0.0])
                seconds[0] += float(row["setup"])
                seconds[1] += float(row["seconds"])
                on_done(by_index[k], unpack(row["arrays"], row["meta"]), float(row["seconds"]))
                bar.update(by_index[k].size)
            self.timings.update(run=time.perf_counter() - start, actor_setup=sum(b[0] for b in busy.values()),
                                shard_compute=sum(b[1] for b in busy.values()),
                                busiest_actor=max((sum(b) for b in busy.values()), default=0.0))
            self.actors_used = len(busy)
        except EngineError:
            raise
        except Exception as err:
            text = str(err)
            found = _FAILED.search(text)
            if found:
                raise ShardError(int(found.group(2)), found.group(1)) from None
            raise EngineError(f"the Ray run stopped: {type(err).__name__}: {text.strip().splitlines()[-1] if text.strip() else ''}"
                              ) from err
        finally:
            if hasattr(rows, "close"):
                rows.close()  # stops the dataset's execution, which would schedule more shards
            if registry is not None:
                kill_actors(ray, registry)
            bar.close()
            data_log.setLevel(level)
            for key, value in quiet.items():
                setattr(ctx, key, value)
            if started:
                ray.shutdown()
