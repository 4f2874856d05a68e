"""The engine's contract: a step is a function of (shard, settings); an executor runs it on shards.

A `Step` holds everything a shard needs except the model, which `setup` loads once per worker
process (the local process, or one Ray actor); `run(shard)` returns a `ShardOutput` (numpy arrays
plus JSON meta). An `Executor` runs a step over the
shards still to do and hands each finished output to a callback on the driver, which writes it
(store: shards.ShardStore). Executors know nothing of scorers; steps know nothing of executors,
so the local and the Ray executor give the same outputs for the same shards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from mechsieve.config import ConfigError, check_choice
from mechsieve.data.records import Example, Pool
from mechsieve.data.stream import ExampleRefs, ShardReader


class EngineError(RuntimeError):
    """The engine cannot run (Ray missing or unreachable, a method that cannot be sharded, a model
    the workers cannot load); the message names the setting or the install command that fixes it."""


class ShardError(EngineError):
    """A step failed on one shard; `shard` is its index. Nothing of that shard was written."""

    def __init__(self, shard: int, message: str):
        self.shard = shard
        super().__init__(message)


@dataclass
class EngineConfig:
    """How a pool is split into shards and where the shards run."""

    executor: Literal["local", "ray"] = "local"
    """`local`: in this process; `ray`: Ray Data map_batches over an actor pool (`pip install
    'mechsieve[ray]'`)."""
    shard_size: int = 0
    """Examples per shard (one map_batches call, one marker file). 0: the whole pool in one go, in
    memory, without a shard folder (local only; ray then uses 256)."""
    ray_address: str = ""
    """Ray cluster to join: `auto` (the cluster this machine belongs to), `ray://host:10001`, or
    empty to start a Ray instance on this machine."""
    actors: int = 1
    """Ray actors, each holding one copy of the model."""
    gpus_per_actor: float = 0.0
    """GPUs reserved per actor (0: CPU actors; 1: one model per GPU; 0.5: two per GPU)."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor (also its torch thread count)."""
    overwrite: bool = False
    """Discard the shards an earlier, interrupted run left (else: resume from them; shards made
    under other settings are refused)."""
    keep_shards: bool = False
    """Keep the shard folder after a finished run (else it is removed once the result is written)."""
    stream: Literal["auto", "on", "off"] = "auto"
    """Pools larger than memory (data.stream): `on`: the driver scans the pool once and holds only
    its ids, sources and fingerprint; every shard (of `shard_size`, default 256) reads its own
    records where it runs, Ray actors included (they then need the data at the same path).
    `off`: the pool is read into memory. `auto`: `on` for a local JSONL / CSV / Parquet file or
    save_to_disk folder larger than `stream_above_mb`. Methods that need the whole pool at once
    (kcenter, influence, ...) refuse `on`. Not `data.streaming`, which is how datasets reads a
    hub dataset."""
    stream_above_mb: float = 512.0
    """Size on disk (megabytes) above which `stream=auto` streams the pool."""

    def __post_init__(self) -> None:
        check_choice("engine.executor", self.executor, ("local", "ray"))
        if self.shard_size < 0:
            raise ConfigError(f"engine.shard_size={self.shard_size} must be >= 0 (0: one shard, local only)")
        if self.actors < 1:
            raise ConfigError(f"engine.actors={self.actors} must be >= 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise ConfigError("engine.gpus_per_actor must be >= 0 and engine.cpus_per_actor > 0")
        check_choice("engine.stream", self.stream, ("auto", "on", "off"))
        if self.stream_above_mb < 0:
            raise ConfigError(f"engine.stream_above_mb={self.stream_above_mb} must be >= 0")

    @property
    def sharded(self) -> bool:
        """Whether runs go through shards (a folder with markers), not one in-memory pass (a
        streamed pool always is)."""
        return self.executor == "ray" or self.shard_size > 0 or self.stream == "on"

    def effective_shard_size(self) -> int:
        return self.shard_size or 256


@dataclass
class Shard:
    """A contiguous slice `[start, start + size)` of the pool, numbered `index`."""

    index: int
    start: int
    examples: list[Example]
    reader: ShardReader | None = None
    """A streamed pool's shard (data.stream): its ids and where its records are. `examples` is
    then empty (the driver holds none) until `load()` reads them where the shard runs."""

    @property
    def size(self) -> int:
        return len(self.reader.ids) if self.reader is not None else len(self.examples)

    @property
    def stop(self) -> int:
        return self.start + self.size

    @property
    def ids(self) -> Sequence[str]:
        """The shard's ids in order (a streamed shard's: its reader's CompactIds, not a copy)."""
        return self.reader.ids if self.reader is not None else [ex.id for ex in self.examples]

    def load(self) -> Shard:
        """This shard with its examples: a streamed shard's read by its reader, any other as it is."""
        if self.reader is None:
            return self
        return Shard(self.index, self.start, self.reader.read())

    def pool(self) -> Pool:
        return Pool(self.load().examples, f"shard-{self.index:05d}", "memory", "memory")

    def describe(self) -> str:
        ids = self.reader.ids if self.reader is not None else [ex.id for ex in self.examples[:1]]
        first = ids[0] if ids else "-"
        return f"shard {self.index} (examples {self.start}..{self.stop - 1}, first id {first!r})"


def plan_shards(examples: Sequence[Example], shard_size: int) -> list[Shard]:
    """Contiguous shards of `shard_size` examples in pool order (the last may be shorter); a
    streamed pool's examples (data.stream.ExampleRefs) give shards that read their own records.

    Deterministic: the same pool and size give the same shards, whatever the executor, so a run
    started locally may be resumed on Ray and the other way round (and streamed or not).
    """
    if shard_size < 1:
        raise ConfigError(f"engine.shard_size={shard_size} must be >= 1 to plan shards")
    if isinstance(examples, ExampleRefs):
        n = len(examples)
        return [Shard(k, start, [], examples.pool.shard_reader(start, min(start + shard_size, n)))
                for k, start in enumerate(range(0, n, shard_size))]
    return [Shard(k, start, list(examples[start:start + shard_size]))
            for k, start in enumerate(range(0, len(examples), shard_size))]


@dataclass
class ShardOutput:
    """What a step returns for one shard: numpy arrays (first axis: the shard's m examples, or
    their tokens for per-token steps) and JSON meta."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Step(ABC):
    """A function of (shard, settings), run by any executor (see the module docstring).

    Subclasses keep their settings as plain attributes (they are pickled to Ray actors); anything
    heavy a worker builds (the model) is made in `setup` and dropped by `__getstate__`.
    """

    name: ClassVar[str] = ""
    transient: ClassVar[tuple[str, ...]] = ()
    """Attributes `__getstate__` drops (rebuilt by `setup` in the worker)."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-able settings; with the pool's fingerprint and the shard plan they key the shard folder."""

    def setup(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Called once per worker process before its first shard (load the model here)."""

    @abstractmethod
    def run(self, shard: Shard) -> ShardOutput:
        """Compute one shard; must not write files (the driver writes outputs atomically)."""

    def check_output(self, shard: Shard, output: ShardOutput) -> None:
        """Raise ShardError unless every array has one row per example of `shard` (the driver
        checks before it writes a shard, and again as it reads one back: rows saved against other
        ids would pair scores or activations with the wrong examples). Steps whose arrays are
        per token override this."""
        m = shard.size
        for name, values in output.arrays.items():
            rows = np.shape(values)[0] if np.ndim(values) else None
            if rows != m:
                raise ShardError(shard.index, f"{shard.describe()}: {name} has {rows} rows for its {m} examples; "
                                 f"a bug of the {self.name} step, please report")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self.transient:
            state[name] = None
        return state


OnShardDone = Callable[[Shard, ShardOutput, float], None]
"""Driver-side callback: (shard, its output, seconds the step took)."""


class Executor(ABC):
    """Runs a step over shards; calls `on_done` on the driver as each shard finishes."""

    name: ClassVar[str] = ""

    @abstractmethod
    def execute(self, step: Step, shards: list[Shard], on_done: OnShardDone, progress: bool = True) -> None:
        """Run `step` on every shard of `shards` (raise ShardError naming the shard on a failure)."""

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name}
