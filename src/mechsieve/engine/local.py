"""The local executor: every shard in this process, one after another, one model."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from mechsieve.engine.base import EngineError, Executor, OnShardDone, Shard, ShardError, Step


class LocalExecutor(Executor):
    """Runs the step in process; the model is the step's own (loaded once by `setup`)."""

    name = "local"

    def execute(self, step: Step, shards: list[Shard], on_done: OnShardDone, progress: bool = True) -> None:
        if not shards:
            return
        step.setup()
        bar = tqdm(total=sum(s.size for s in shards), unit="ex", desc=f"{step.name}: shards",
                   disable=not progress, leave=False)
        try:
            for shard in shards:
                start = time.perf_counter()
                try:
                    output = step.run(shard.load())  # a streamed shard reads its records here
                except (ShardError, EngineError):
                    raise
                except Exception as err:
                    raise ShardError(shard.index, f"{shard.describe()} failed: {type(err).__name__}: {err}") from err
                on_done(shard, output, time.perf_counter() - start)
                bar.update(shard.size)
        finally:
            bar.close()
