"""Batched greedy generation: prompts rendered as for training, left-padded by length buckets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mechsieve.capture.batching import collate, plan_batches
from mechsieve.data.records import Example
from mechsieve.data.render import RenderConfig, pad_id, render_example

END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


def stop_ids(tokenizer: Any) -> list[int]:
    """EOS and the end-of-turn markers the tokenizer knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[m] for m in END_MARKERS if m in vocab}
    return sorted(ids)


def generate_greedy(model: Any, tokenizer: Any, examples: Sequence[Example], render_cfg: RenderConfig | None = None,
                    max_new_tokens: int = 256, max_tokens: int = 4096, max_batch: int = 32,
                    progress: bool = True) -> list[str]:
    """Greedy continuation of each example's prompt (its response left out), decoded without
    special tokens. Batches are planned on prompt length + max_new_tokens."""
    from tqdm.auto import tqdm

    rendered = [render_example(ex, tokenizer, render_cfg, add_generation_prompt=True) for ex in examples]
    plan = plan_batches([len(r) + max_new_tokens for r in rendered], max_tokens, max_batch)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    eos = stop_ids(tokenizer)
    out: list[str] = [""] * len(examples)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(examples), desc="generate", unit="ex", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for idx in plan.batches:
                batch = collate([rendered[i] for i in idx], pad, "left").to(device)
                gen = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     eos_token_id=eos, pad_token_id=pad, temperature=None, top_p=None,
                                     top_k=None)
                new = gen[:, batch.input_ids.shape[1]:]
                for row, i in enumerate(idx):
                    tokens = new[row].tolist()
                    cut = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
                    out[i] = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out
