"""Records, readers, writers and rendering with response masks."""

from mechsieve.data.formats import FORMATS, RecordError, detect_format
from mechsieve.data.readers import DataConfig, DataError, read_examples, read_pool
from mechsieve.data.records import Example, Pool, content_hash
from mechsieve.data.render import (
           RenderConfig,
           Rendered,
           RenderStats,
           pad_id,
           render_example,
           render_pool,
)
from mechsieve.data.writers import write_jsonl, write_subset

__all__ = ["FORMATS", "DataConfig", "DataError", "Example", "Pool", "RecordError", "RenderConfig",
           "RenderStats", "Rendered", "content_hash", "detect_format", "pad_id", "read_examples", "read_pool",
           "render_example", "render_pool", "write_jsonl", "write_subset"]
