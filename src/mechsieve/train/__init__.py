"""Supervised fine-tuning (LoRA or full) that honours per-token loss masks (labels -100)."""

from mechsieve.train.config import TrainConfig, TrainResult
from mechsieve.train.items import (
                                   IGNORE,
                                   ItemBatch,
                                   TrainItem,
                                   collate_items,
                                   is_tokenized,
                                   items_from_examples,
                                   load_tokenized,
                                   save_tokenized,
)
from mechsieve.train.loop import EpochEnd, masked_nll_sum, steps_per_epoch, train
from mechsieve.train.lora import load_adapter, wrap_for_training

__all__ = ["IGNORE", "EpochEnd", "ItemBatch", "TrainConfig", "TrainItem", "TrainResult", "collate_items", "is_tokenized",
           "items_from_examples", "load_adapter", "load_tokenized", "masked_nll_sum", "save_tokenized",
           "steps_per_epoch", "train", "wrap_for_training"]
