"""The execution engine: steps as functions of (shard, settings), run in process (`local`) or on
a Ray cluster (`ray`), with per-shard outputs and completion markers so a stopped run resumes.
Only `engine.ray_executor` imports ray, and only when a Ray run starts."""

from mechsieve.engine.base import (
    EngineConfig,
    EngineError,
    Executor,
    Shard,
    ShardError,
    ShardOutput,
    Step,
    plan_shards,
)
from mechsieve.engine.run import (
    capture_sharded,
    make_executor,
    run_step,
    score_pool,
    score_pool_many,
    select_pool,
    select_pool_many,
    shardable_methods,
    token_scores_sharded,
)
from mechsieve.engine.shards import ShardStore

__all__ = ["EngineConfig", "EngineError", "Executor", "Shard", "ShardError", "ShardOutput", "ShardStore", "Step",
           "capture_sharded", "make_executor", "plan_shards", "run_step", "score_pool", "score_pool_many",
           "select_pool", "select_pool_many",
           "shardable_methods", "token_scores_sharded"]
