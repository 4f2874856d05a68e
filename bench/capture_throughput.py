"""Capture throughput against a bare forward pass, padding efficiency, and peak memory.

SmolLM2-135M-Instruct on GSM8K train examples (chat template, max_len 512). For every batch of
the plan, a bare forward pass (the full model, logits included, and the decoder body alone) and
the capture (all 30 layers, reductions mean_response + last_prompt + drift) run back to back on
the same batch, so load on the machine affects both alike; the ratio is of summed times.
Peak memory: child processes capture 300 and 1,200 examples and report their peak RSS, set
against the size of their result arrays.

    python bench/capture_throughput.py            # writes bench/results/capture_throughput.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from harness import Results, read_source

REDUCTIONS = ["mean_response", "last_prompt", "drift"]


def load(n: int):
    from mechsieve.data import RenderConfig, render_pool
    from mechsieve.models import load_model

    loaded = load_model("smollm2-135m-instruct")
    rendered, stats = render_pool(read_source("gsm8k", limit=n), loaded.tokenizer, RenderConfig(max_len=512))
    return loaded, rendered, stats


def throughput(n: int, max_tokens: int) -> dict:
    from mechsieve.capture import CaptureConfig, capture, collate, plan_batches

    loaded, rendered, rstats = load(n)
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    plan = plan_batches([len(r) for r in rendered], max_tokens=max_tokens, max_batch=64)
    cfg = CaptureConfig(layers="all", reductions=REDUCTIONS, max_tokens=max_tokens, max_batch=64)
    times = {"bare_full": 0.0, "bare_body": 0.0, "capture": 0.0}
    # Warm-up on the smallest batch (first-call allocations are not throughput).
    warm = collate([rendered[i] for i in plan.batches[-1]], pad)
    with torch.no_grad():
        model(input_ids=warm.input_ids, attention_mask=warm.attention_mask, position_ids=warm.position_ids)
    for k, idx in enumerate(plan.batches):
        items = [rendered[i] for i in idx]
        batch = collate(items, pad)
        order = ["bare_full", "bare_body", "capture"] if k % 2 == 0 else ["capture", "bare_body", "bare_full"]
        for what in order:
            t0 = time.perf_counter()
            if what == "capture":
                res = capture(model, items, cfg, pad_id=pad, progress=False)
                assert len(res.plan.batches) == 1  # the same single batch as the bare pass
            else:
                with torch.no_grad():
                    target = model if what == "bare_full" else model.model
                    target(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False)
            times[what] += time.perf_counter() - t0
        print(f"  batch {k + 1}/{len(plan.batches)}: {len(idx)} x {batch.input_ids.shape[1]}", flush=True)
    tokens = plan.real_tokens
    tps = {k: tokens / v for k, v in times.items()}
    return {
        "examples": n, "tokens": tokens, "render": rstats.summary(),
        "batches": len(plan.batches), "max_tokens_per_batch": max_tokens,
        "padding_efficiency": round(plan.padding_efficiency, 4),
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "ratio_capture_to_bare_full": round(tps["capture"] / tps["bare_full"], 3),
        "ratio_capture_to_bare_body": round(tps["capture"] / tps["bare_body"], 3),
    }


def child_memory(n: int, max_tokens: int) -> dict:
    """Run in a fresh process: peak RSS of capturing n examples, and the result arrays' size."""
    from mechsieve.capture import CaptureConfig, capture

    loaded, rendered, _ = load(n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = capture(loaded.model, rendered, CaptureConfig(layers="all", reductions=REDUCTIONS, max_tokens=max_tokens),
                  pad_id=loaded.tokenizer.pad_token_id, progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    arrays = sum(a.nbytes for a in res.arrays.values()) / 2**20
    return {"examples": n, "tokens": res.plan.real_tokens, "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak, 1), "rss_before_capture_mb": round(base, 1),
            "result_arrays_mb": round(arrays, 1),
            "peak_minus_arrays_mb": round(peak - arrays, 1),
            "padding_efficiency": round(res.plan.padding_efficiency, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--memory-sizes", default="300,1200")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_memory(args.child, args.max_tokens)))
        return
    torch.manual_seed(0)
    results = Results("capture_throughput", "capture_throughput", model="smollm2-135m-instruct (float32, cpu)")
    results.set("data", "shared/data/gsm8k/train.jsonl (first N)")
    results.set("capture", {"layers": "all (30)", "site": "resid", "reductions": REDUCTIONS})
    print(f"throughput on {args.examples} examples", flush=True)
    results.phase("throughput").update(throughput(args.examples, args.max_tokens))
    results.save(finished="throughput")
    memory = results.phase("memory")
    memory["runs"] = []
    for n in [int(x) for x in args.memory_sizes.split(",") if x]:
        print(f"peak memory at {n} examples (child process)", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--max-tokens", str(args.max_tokens)],
                              capture_output=True, text=True, check=True)
        memory["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mem = memory["runs"]
    if len(mem) >= 2:
        memory["growth"] = {
            "peak_minus_arrays_mb": [m["peak_minus_arrays_mb"] for m in mem],
            "note": "peak RSS less the result arrays; flat means memory does not grow with the pool"}
    results.save(finished="memory")
    t = results["throughput"]
    print(f"capture {t['tokens_per_s']['capture']} tok/s = {t['ratio_capture_to_bare_full']} x bare forward "
          f"(full model) and {t['ratio_capture_to_bare_body']} x (decoder body); padding efficiency "
          f"{t['padding_efficiency']}; peak RSS " + ", ".join(f"{m['examples']}: {m['peak_rss_mb']} MB "
          f"(arrays {m['result_arrays_mb']} MB)" for m in mem) + f" -> {results.path}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
