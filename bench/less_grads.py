"""LESS per-example LoRA gradient throughput: batched (capture/gradients.py) vs the looped reference.

SmolLM2-135M-Instruct with a LoRA adapter as the LESS scorer builds it (the trainer's
`all-linear`, rank 16 by default; B set to small seeded random values, as after a warm-up, so
every A gradient is live), in eval mode, on `--n` GSM8K train examples rendered to `--max-len`
tokens. The same examples, in the same process, go through `per_example_grads` (one backward
per length-bucketed batch, gradients from module inputs and output gradients) and
`per_example_grads_loop` (one example at a time, torch.autograd.grad on the LoRA weights); the
two passes alternate `--repeats` times and the median is reported. The two results must agree
(max abs difference, relative to the largest entry, under 1e-4; asserted). Also timed: the rest
of LESS's per-example cost, the Adam preconditioning and the dense Rademacher projection to
`--proj-dim`, on the batched gradients.

    python bench/less_grads.py                    # writes bench/results/less_grads.json
    MECHSIEVE_BENCH_RESULTS=/tmp/smoke python bench/less_grads.py --tiny --n 8
                                                  # smoke: a 2-layer random model, SmolLM2's tokenizer
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from harness import Results, read_source


def build(args):
    """(loaded model with a LoRA adapter, rendered examples, LoRA modules)."""
    from mechsieve.capture.gradients import lora_modules
    from mechsieve.data import RenderConfig, render_pool
    from mechsieve.models import load_model
    from mechsieve.train import TrainConfig, wrap_for_training
    from mechsieve.train.lora import PEFT_DEPRECATION

    loaded = load_model("smollm2-135m-instruct")
    if args.tiny:
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(vocab_size=loaded.model.config.vocab_size, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048, tie_word_embeddings=True)
        torch.manual_seed(0)
        loaded.model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    train_cfg = TrainConfig(lora_r=args.lora_r, target_modules=args.modules)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
        loaded.model = wrap_for_training(loaded.model, train_cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    loaded.model.eval()
    rendered, _ = render_pool(read_source("gsm8k", limit=args.n), loaded.tokenizer, RenderConfig(max_len=args.max_len))
    return loaded, rendered, lora_modules(loaded.model), train_cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=64, help="examples")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=2048, help="token budget of one batched backward")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--modules", default="all-linear", help="LoRA target modules (all-linear or q_proj,v_proj,...)")
    p.add_argument("--proj-dim", type=int, default=8192, help="0: skip the projection timing")
    p.add_argument("--project-mb", type=float, default=2048.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a 2-layer random model instead of SmolLM2 (smoke)")
    args = p.parse_args()

    from mechsieve.capture.gradients import (
        RademacherProjector,
        iter_per_example_grads,
        mean_response_loss,
        per_example_grads,
        per_example_grads_loop,
        project_rows,
    )
    from mechsieve.data import pad_id
    from mechsieve.scorers.less import BLOCK_ROWS, adam_direction

    model_name = ("tiny random Llama (2 layers, d=64; SmolLM2 tokenizer)" if args.tiny else
                  "smollm2-135m-instruct (float32)")
    results = Results("less_grads", "LESS per-example LoRA gradients: batched vs looped", model=model_name)
    result = results.phase("grads")
    loaded, rendered, mods, train_cfg = build(args)
    model, pad = loaded.model, pad_id(loaded.tokenizer)
    n_params = sum(m.weight.numel() for _, m in mods)
    tokens = int(sum(len(r) for r in rendered))
    print(f"{len(rendered)} examples, {tokens} tokens, {len(mods)} LoRA matrices, {n_params:,} parameters", flush=True)

    def batched():
        return per_example_grads(model, rendered, mods, mean_response_loss, pad_id=pad,
                                 max_tokens=args.max_tokens, max_batch=args.max_batch)

    def looped():
        return per_example_grads_loop(model, rendered, mods, mean_response_loss, pad_id=pad).numpy()

    # first calls allocate; not throughput
    per_example_grads(model, rendered[:2], mods, mean_response_loss, pad_id=pad)
    per_example_grads_loop(model, rendered[:1], mods, mean_response_loss, pad_id=pad)
    times: dict[str, list[float]] = {"batched": [], "looped": []}
    fast = ref = None
    for k in range(args.repeats):
        for what in (("batched", "looped") if k % 2 == 0 else ("looped", "batched")):
            t0 = time.perf_counter()
            out = batched() if what == "batched" else looped()
            times[what].append(time.perf_counter() - t0)
            if what == "batched":
                fast = out
            else:
                ref = out
            print(f"  {what:<8} {times[what][-1]:7.2f} s", flush=True)
    diff = float(np.abs(fast - ref).max())
    scale = float(np.abs(ref).max())
    med = {k: statistics.median(v) for k, v in times.items()}
    result.update({
        "settings": {"examples": len(rendered), "tokens": tokens, "max_len": args.max_len,
                     "max_tokens": args.max_tokens, "max_batch": args.max_batch, "lora_r": train_cfg.lora_r,
                     "modules": train_cfg.target_modules, "lora_matrices": len(mods), "lora_parameters": n_params,
                     "repeats": args.repeats, "loss": "mean over response tokens"},
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "examples_per_s": {k: round(len(rendered) / v, 3) for k, v in med.items()},
        "speedup": round(med["looped"] / med["batched"], 3),
        "agreement": {"max_abs_diff": diff, "max_abs_entry": scale, "relative": diff / scale if scale else 0.0},
    })
    results.targets()["batched_at_least_5x"] = result["speedup"] >= 5.0
    results.save(finished="grads")
    assert diff <= 1e-4 * scale, f"batched and looped gradients disagree: max abs diff {diff} (max entry {scale})"

    if args.proj_dim:
        proj = RademacherProjector(n_params, args.proj_dim, seed=0, block_rows=BLOCK_ROWS)
        m = torch.zeros(n_params)
        v = torch.full((n_params,), 1e-6)
        t0 = time.perf_counter()
        rows = iter_per_example_grads(model, rendered, mods, mean_response_loss, pad_id=pad,
                                      max_tokens=args.max_tokens, max_batch=args.max_batch)
        project_rows(rows, proj, len(rendered), lambda g: adam_direction(g, m, v, 10, (0.9, 0.999), 1e-8),
                     args.project_mb)
        total = time.perf_counter() - t0
        results.phase("less_features").update({
            "proj_dim": args.proj_dim, "project_mb": args.project_mb,
            "examples_per_pass": max(1, int(args.project_mb * 2**20 // (4 * n_params))),
            "seconds": round(total, 3), "examples_per_s": round(len(rendered) / total, 3),
            "note": "batched gradients + Adam preconditioning + dense Rademacher projection, end to end"})
        results.save(finished="less_features")
    else:  # features measured with other gradients than these
        results.drop("less_features")
        results.save()
    line = (f"less_grads: batched {result['examples_per_s']['batched']} ex/s, looped "
            f"{result['examples_per_s']['looped']} ex/s, speedup {result['speedup']}x; max abs diff {diff:.2e}")
    if args.proj_dim:
        line += f"; features (grads+adam+projection to {args.proj_dim}) {results['less_features']['examples_per_s']} ex/s"
    print(line)
    print(f"wrote {results.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
