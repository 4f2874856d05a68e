"""Training smoke benchmark: LoRA on SmolLM2-135M-Instruct with GSM8K, held-out loss before/after.

200 GSM8K train examples (chat template, max_len 512), LoRA r=16 on all linear layers, a fixed
number of optimizer steps; held-out loss on the answers of 100 GSM8K test examples before and
after training (it must drop). Reports wall time per optimizer step and tokens/s (label tokens
trained on, and all input tokens processed). float32 on CPU.

    flock /tmp/mechsieve-bench.lock python bench/train_smoke.py     # bench/results/train_smoke.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from _common import command_line

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gsm8k"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=200, help="GSM8K train examples")
    p.add_argument("--test", type=int, default=100, help="GSM8K test examples for the held-out loss")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--max-tokens", type=int, default=1024, help="token budget of a micro-batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model (a folder for a quick dry run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_smoke.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mechsieve.config import to_dict
    from mechsieve.data import RenderConfig, read_pool
    from mechsieve.evaluate import heldout_loss
    from mechsieve.models import load_model
    from mechsieve.train import TrainConfig, items_from_examples, train

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    render = RenderConfig(max_len=512)
    train_pool = read_pool(DATA / "train.jsonl", limit=args.train)
    test_pool = read_pool(DATA / "test.jsonl", limit=args.test)
    items = items_from_examples(train_pool.examples, loaded.tokenizer, render)
    test_items = items_from_examples(test_pool.examples, loaded.tokenizer, render)

    t0 = time.perf_counter()
    before = heldout_loss(loaded.model, loaded.tokenizer, test_items, max_tokens=2048, progress=False)
    eval_before_s = time.perf_counter() - t0
    cfg = TrainConfig(max_steps=args.steps, learning_rate=args.lr, schedule="cosine", warmup_steps=3,
                      max_tokens=args.max_tokens, lora_r=16, lora_alpha=32, lora_dropout=0.05, seed=0)
    result = train(loaded, items, cfg, out_dir=None, progress=False)
    t0 = time.perf_counter()
    after = heldout_loss(loaded.model, loaded.tokenizer, test_items, max_tokens=2048, progress=False)
    eval_after_s = time.perf_counter() - t0

    s = result.settings
    report = {
        "benchmark": "train_smoke",
        "command": command_line(__file__, argv, runner="flock /tmp/mechsieve-bench.lock"),
        "model": loaded.identity,
        "data": {"train": str(DATA / "train.jsonl"), "train_examples": len(items),
                 "train_label_tokens": int(sum(it.n_targets for it in items)),
                 "test": str(DATA / "test.jsonl"), "test_examples": len(test_items)},
        "train": to_dict(cfg),
        "steps": result.steps,
        "epochs_seen": s["epochs_seen"],
        "trainable_parameters": s["trainable_parameters"],
        "heldout_before": before,
        "heldout_after": after,
        "loss_drop_per_token": before["loss_per_token"] - after["loss_per_token"],
        "loss_dropped": after["loss_per_token"] < before["loss_per_token"],
        "loss_curve": [round(x, 5) for x in result.loss_curve],
        "train_seconds": round(result.seconds, 2),
        "seconds_per_step": round(result.seconds / result.steps, 3),
        "label_tokens": result.tokens,
        "label_tokens_per_s": round(result.tokens / result.seconds, 2),
        "input_tokens": s["input_tokens"],
        "input_tokens_per_s": round(s["input_tokens"] / result.seconds, 2),
        "padding_efficiency": round(s["input_tokens"] / s["padded_tokens"], 4),
        "eval_seconds": {"before": round(eval_before_s, 2), "after": round(eval_after_s, 2)},
        "eval_tokens_per_s": round(2 * sum(len(it) for it in test_items) / (eval_before_s + eval_after_s), 2),
        "load_seconds": round(load_seconds, 2),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": str(loaded.device)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"train_smoke: held-out loss {before['loss_per_token']:.4f} -> {after['loss_per_token']:.4f} per token "
          f"after {result.steps} LoRA steps; {report['seconds_per_step']} s/step, "
          f"{report['input_tokens_per_s']} input tok/s ({report['label_tokens_per_s']} label tok/s) -> {out}")
    return 0 if report["loss_dropped"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
