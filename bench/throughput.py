"""Throughput of the engine: Ray (2 actors) against the local executor on CPU, and GPU capture
against a bare forward pass at real model sizes.

CPU (always): NAIT on the B1 pool (the harness's `mixed_pool`) with SmolLM2-135M-Instruct, scored three ways: in process in one pass (what `mechsieve
select` does by default), through the local executor in shards, and through the Ray executor
with `--actors` actors on the same shards. Reports wall times, the Ray / local ratio, and where
Ray's extra time goes: starting Ray, starting the actors and loading one model in each, shard
compute, and the rest (scheduling, moving examples and results); and that the three give the
same scores (Ray and the local executor bit for bit: same shards, same batches).

GPU (`--gpu`, when CUDA is visible): random-weight Llama-architecture models of about 1B and 7B
parameters in bfloat16 with SDPA attention, on synthetic 512-token examples: tokens/s of a bare
forward pass of the decoder body and of capture with NAIT's reduction (drift at every layer),
their ratio, model FLOPs utilisation (2 x parameters x tokens/s / the card's dense bf16 peak),
peak GPU memory, and the projected time to score 52,000 examples of 512 tokens on the 7B model.
Without CUDA the section records that there was no GPU in this run.

    flock /tmp/mechsieve-bench.lock python bench/throughput.py              # -> bench/results/throughput.json
    flock /tmp/mechsieve-bench.lock python bench/throughput.py --per-source 20 --gpu
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from harness import ROOT, Results
from harness.pools import mixed_pool

MODEL = "smollm2-135m-instruct"
# Dense bf16 peak (no sparsity) per card, FLOP/s; matched against torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
GPU_SIZES = {
    # about 1B: Llama-3.2-1B's shape; about 7B: Llama-2-7B's shape
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
}


def folder_bytes_matching(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


# --- CPU: Ray against local ----------------------------------------------------------------------

def cpu_section(args) -> dict:
    import torch

    from mechsieve.engine import EngineConfig, score_pool
    from mechsieve.models.loading import ModelConfig, load_model
    from mechsieve.scorers import make_scorer

    pool, target = mixed_pool(args.per_source, args.target, args.seed)
    settings = {"render": {"max_len": args.max_len}, "max_tokens": args.max_tokens}
    print(f"B1 pool: {len(pool)} examples ({args.per_source} per source), target {len(target)} GSM8K", flush=True)
    work = ROOT / "runs" / "bench" / "throughput"
    out: dict = {"pool": {"examples": len(pool), "per_source": args.per_source, "target": len(target),
                          "by_source": pool.counts_by_source()},
                 "method": "nait", "settings": settings, "shard_size": args.shard_size, "actors": args.actors,
                 "torch_threads_local": torch.get_num_threads(), "torch_threads_per_actor": 1}

    t0 = time.perf_counter()
    loaded = load_model(ModelConfig(name=MODEL, device="cpu"))
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = make_scorer("nait", settings).score(pool, target=target, loaded=loaded, progress=not args.quiet)
    t_one = time.perf_counter() - t0
    out["local_one_pass"] = {"model_load_s": round(t_load, 2), "score_s": round(t_one, 2),
                             "total_s": round(t_load + t_one, 2),
                             "phases_s": {k: round(v, 2) for k, v in one.timings.items()}}
    print(f"local, one pass: load {t_load:.1f} s + score {t_one:.1f} s", flush=True)

    local_engine = EngineConfig(executor="local", shard_size=args.shard_size)
    t0 = time.perf_counter()
    sharded, rep = score_pool(make_scorer("nait", settings), pool, target=target, model=loaded,
                              engine=local_engine, folder=work / "local", progress=not args.quiet)
    t_sharded = time.perf_counter() - t0
    out["local_shards"] = {"score_s": round(t_sharded, 2), "report": rep}
    print(f"local, {rep['shards']} shards: {t_sharded:.1f} s", flush=True)
    del loaded  # the Ray actors load their own copies; the driver keeps one only for `prepare`

    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.actors, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    t_ray = time.perf_counter() - t0
    engine = EngineConfig(executor="ray", shard_size=args.shard_size, actors=args.actors, keep_shards=True)
    t0 = time.perf_counter()
    remote, rep = score_pool(make_scorer("nait", settings), pool, target=target, model=ModelConfig(name=MODEL, device="cpu"),
                             engine=engine, folder=work / "ray", progress=not args.quiet)
    t_remote = time.perf_counter() - t0
    import pickle
    import shutil

    from mechsieve.engine.steps import ScoreStep

    # what every actor receives: the step (scorer class, settings, NAIT's directions), pickled
    step = ScoreStep(make_scorer("nait", settings), {}, ModelConfig(name=MODEL, device="cpu"))
    step_bytes = len(pickle.dumps(step)) + folder_bytes_matching(work / "ray", "state.*")
    results_bytes = folder_bytes_matching(work / "ray", "shard-*")
    shutil.rmtree(work / "ray", ignore_errors=True)
    ray.shutdown()
    n = args.actors
    setup, compute = rep.get("actor_setup", 0.0), rep.get("shard_compute", 0.0)
    run, busiest = rep.get("run", rep["seconds"]), rep.get("busiest_actor", 0.0)
    total = t_ray + t_remote
    out["ray"] = {
        "ray_start_s": round(t_ray, 2), "score_s": round(t_remote, 2), "total_s": round(total, 2),
        "report": rep,
        "where_the_time_goes_s": {
            "ray_start": round(t_ray, 2),
            "prepare_on_driver (model load + directions)": rep.get("prepare_seconds"),
            "actor_start_and_model_load (summed over actors)": round(setup, 2),
            "shard_compute (summed over actors)": round(compute, 2),
            "busiest_actor (start + model load + its shards)": round(busiest, 2),
            "worker_process_start_scheduling_transfer (run minus the busiest actor)": round(max(run - busiest, 0.0), 2),
            "combine_and_write": round(max(t_remote - (rep.get("prepare_seconds") or 0) - rep["seconds"], 0.0), 2),
        },
        "bytes": {"shard_results": results_bytes, "step_with_state": step_bytes},
    }
    local_total = out["local_one_pass"]["total_s"]
    out["ratio_ray_to_local_one_pass"] = round(total / local_total, 3)
    out["ratio_ray_to_local_one_pass_without_ray_start"] = round(t_remote / local_total, 3)
    out["ratio_ray_to_local_shards"] = round(t_remote / (t_sharded + t_load), 3)
    out["scores"] = {
        "ray_equals_local_shards_exactly": bool(np.array_equal(remote.scores, sharded.scores)),
        "max_abs_diff_ray_vs_one_pass": float(np.max(np.abs(remote.scores - one.scores))),
        "max_abs_score": float(np.max(np.abs(one.scores))),
    }
    print(f"ray, {n} actors: start {t_ray:.1f} s + run {t_remote:.1f} s; ratio to local one pass "
          f"{out['ratio_ray_to_local_one_pass']}", flush=True)
    return out


# --- GPU: capture against a bare forward pass ----------------------------------------------------

def synthetic(n: int, length: int, vocab: int, seed: int) -> list:
    """`n` rendered examples of `length` tokens: a quarter prompt, the rest response."""
    from mechsieve.data.render import Rendered

    rng = np.random.default_rng(seed)
    prompt = length // 4
    mask = np.zeros(length, dtype=bool)
    mask[prompt:] = True
    return [Rendered(rng.integers(10, vocab, size=length).astype(np.int64), mask.copy(), prompt, 1)
            for _ in range(n)]


def gpu_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**GPU_SIZES[name], max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    return model


def gpu_section(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"status": "no GPU in this run", "cuda_available": False}
    from mechsieve.capture import CaptureConfig, capture, collate, plan_batches

    card = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in card), None)
    out: dict = {"status": "measured", "card": card, "peak_bf16_flops": peak, "sequence_tokens": args.gpu_len,
                 "examples": args.gpu_examples, "max_tokens_per_batch": args.gpu_max_tokens, "models": {}}
    for name in GPU_SIZES:
        model = gpu_model(name)
        params = sum(p.numel() for p in model.parameters())
        rendered = synthetic(args.gpu_examples, args.gpu_len, model.config.vocab_size, args.seed)
        plan = plan_batches([len(r) for r in rendered], args.gpu_max_tokens, 1024)
        cfg = CaptureConfig(layers="all", reductions=["drift"], max_tokens=args.gpu_max_tokens, max_batch=1024)
        warm = collate([rendered[i] for i in plan.batches[0]], 0).to("cuda")
        with torch.no_grad():  # warm-up: kernels, allocator
            model.model(input_ids=warm.input_ids, attention_mask=warm.attention_mask,
                        position_ids=warm.position_ids, use_cache=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            for idx in plan.batches:
                b = collate([rendered[i] for i in idx], 0).to("cuda")
                model.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                            use_cache=False)
        torch.cuda.synchronize()
        t_bare = time.perf_counter() - t0
        mem_bare = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        capture(model, rendered, cfg, pad_id=0, progress=False)
        torch.cuda.synchronize()
        t_cap = time.perf_counter() - t0
        mem_cap = torch.cuda.max_memory_allocated()
        tokens = plan.real_tokens
        tps_bare, tps_cap = tokens / t_bare, tokens / t_cap
        row = {"parameters": params, "tokens": tokens, "batches": len(plan.batches),
               "tokens_per_s": {"bare_forward": round(tps_bare, 1), "capture_nait": round(tps_cap, 1)},
               "ratio_capture_to_bare": round(tps_cap / tps_bare, 3),
               "peak_memory_gib": {"bare_forward": round(mem_bare / 2**30, 2), "capture_nait": round(mem_cap / 2**30, 2)}}
        if peak:
            row["mfu"] = {"bare_forward": round(2 * params * tps_bare / peak, 3),
                          "capture_nait": round(2 * params * tps_cap / peak, 3)}
        if name == "llama-7b":
            row["projected_52k_x_512_minutes"] = round(52_000 * 512 / tps_cap / 60, 1)
        out["models"][name] = row
        print(f"{name}: {params / 1e9:.2f}B params, bare {tps_bare:.0f} tok/s, capture {tps_cap:.0f} tok/s", flush=True)
        del model
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-source", type=int, default=100, help="B1 pool examples per source (7 sources)")
    p.add_argument("--target", type=int, default=32, help="GSM8K target examples (NAIT's directions)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget of one forward batch")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True, help="run the CPU section")
    p.add_argument("--gpu", action="store_true", help="run the GPU section (recorded as absent without CUDA)")
    p.add_argument("--gpu-examples", type=int, default=256)
    p.add_argument("--gpu-len", type=int, default=512)
    p.add_argument("--gpu-max-tokens", type=int, default=32768)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = Results("throughput", "throughput", model=f"{MODEL} (float32, cpu)")
    if args.cpu:
        results.phase("cpu").update(cpu_section(args))
        results.save(finished="cpu")
    results.phase("gpu").update(gpu_section(args) if args.gpu else {"status": "not requested (--gpu)"})
    results.save(finished="gpu")
    cpu = results.get("cpu", {})
    print(f"throughput: ray/local wall ratio {cpu.get('ratio_ray_to_local_one_pass')} "
          f"({args.actors} actors, {cpu.get('pool', {}).get('examples')} examples); gpu: {results['gpu']['status']}; "
          f"-> {results.path}")


if __name__ == "__main__":
    main()
