"""Training smoke benchmark: LoRA on SmolLM2-135M-Instruct with GSM8K, held-out loss before/after.

200 GSM8K train examples (chat template, max_len 512), LoRA r=16 on all linear layers, a fixed
number of optimizer steps; held-out loss on the answers of 100 GSM8K test examples before and
after training (it must drop). Reports wall time per optimizer step and tokens/s (label tokens
trained on, and all input tokens processed). float32 on CPU. The base model's and the trained
model's evaluations and the training run are the harness's `finetune_and_eval`.

    flock /tmp/mechsieve-bench.lock python bench/train_smoke.py     # bench/results/train_smoke.json
"""

from __future__ import annotations

import argparse

import torch

from harness import EvalSettings, Results, finetune_and_eval, heldout_gsm8k, path_of, read_source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=200, help="GSM8K train examples")
    p.add_argument("--test", type=int, default=100, help="GSM8K test examples for the held-out loss")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--max-tokens", type=int, default=1024, help="token budget of a micro-batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model (a folder for a quick dry run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mechsieve.config import to_dict
    from mechsieve.data import RenderConfig
    from mechsieve.train import TrainConfig

    results = Results("train_smoke", "train_smoke", model=args.model, argv=argv)
    out = results.phase("smoke")
    render = RenderConfig(max_len=512)
    train_examples, test = read_source("gsm8k", limit=args.train), heldout_gsm8k(args.test)
    evaluation = EvalSettings(max_len=512, max_tokens=2048)
    cfg = TrainConfig(max_steps=args.steps, learning_rate=args.lr, schedule="cosine", warmup_steps=3,
                      max_tokens=args.max_tokens, lora_r=16, lora_alpha=32, lora_dropout=0.05, seed=0)
    before = finetune_and_eval([], None, test, evaluation=evaluation, model=args.model, progress=False)
    after = finetune_and_eval(train_examples, cfg, test, render, evaluation, model=args.model, progress=False)
    s = after.train_settings
    eval_tokens = before.heldout["tokens"]  # label tokens of the held-out answers
    out.update({
        "data": {"train": str(path_of("gsm8k")), "train_examples": len(train_examples),
                 "test": str(path_of("gsm8k_test")), "test_examples": len(test)},
        "train": to_dict(cfg),
        "steps": after.steps,
        "epochs_seen": s["epochs_seen"],
        "trainable_parameters": s["trainable_parameters"],
        "heldout_before": before.heldout,
        "heldout_after": after.heldout,
        "loss_drop_per_token": before.loss - after.loss,
        "loss_dropped": after.loss < before.loss,
        "loss_curve": [round(x, 5) for x in after.loss_curve],
        "train_seconds": after.train_s,
        "seconds_per_step": round(after.train_s / after.steps, 3),
        "label_tokens": after.train_tokens,
        "label_tokens_per_s": round(after.train_tokens / after.train_s, 2),
        "input_tokens": s["input_tokens"],
        "input_tokens_per_s": round(s["input_tokens"] / after.train_s, 2),
        "padding_efficiency": round(s["input_tokens"] / s["padded_tokens"], 4),
        "eval_seconds": {"before": before.eval_s, "after": after.eval_s},
        "eval_label_tokens_per_s": round(2 * eval_tokens / (before.eval_s + after.eval_s), 2),
    })
    results.save(finished="smoke")
    print(f"train_smoke: held-out loss {before.loss:.4f} -> {after.loss:.4f} per token "
          f"after {after.steps} LoRA steps; {out['seconds_per_step']} s/step, "
          f"{out['input_tokens_per_s']} input tok/s ({out['label_tokens_per_s']} label tok/s) -> {results.path}")
    return 0 if out["loss_dropped"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
