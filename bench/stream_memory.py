"""Driver memory of `mechsieve select` on a pool held in memory and on a streamed one.

A JSONL pool of short chat examples ("What is A plus B?" / "A plus B is C.", every one distinct)
at each size; `mechsieve select --method loss --budget 0.1 --shard-size 256` on a tiny random
Llama (hidden 32, 2 layers, a BPE tokenizer trained here on the pool's words: the scorer is a real
forward pass, cheap enough that reading and holding the pool is what the memory shows), once with
`--no-stream` (the pool read into memory, as before) and once with `--stream` (the driver holds
ids only; every shard reads its own records). Each run is a fresh child process whose own
thread samples its resident set (/proc/self/statm) every 5 ms while the command runs, after the same command has run once on
16 examples (imports and first allocations); reported: baseline (just before the command), peak
and peak minus baseline, and ru_maxrss (the whole process, warm-up included). With the
local executor the driver is also the worker, so the peak includes one shard's work (256
examples). Both modes' scores.parquet must agree exactly (same shards, same batches).

    python bench/stream_memory.py                         # sizes 10000,100000 -> bench/results/stream_memory.json
    python bench/stream_memory.py --sizes 200,2000        # a quick trial (set MECHSIEVE_BENCH_RESULTS elsewhere)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import Results

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MODEL = "tiny random Llama (hidden 32, 2 layers, 4 heads; BPE vocabulary 300 trained here)"


def example(i: int) -> dict:
    a, b = i % 1000, i // 1000
    return {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                         {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}


def write_pool(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps(example(i)) + "\n")
    return path


def build_model(folder: Path) -> Path:
    """A tiny random Llama and a BPE tokenizer with a ChatML template, saved to `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([m["content"] for i in range(2000) for m in example(i)["messages"]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    cfg = AutoConfig.for_model("llama", vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


class RssSampler:
    """The process's resident set every `every` seconds, on a thread of its own (peak kept)."""

    def __init__(self, every: float = 0.005) -> None:
        self.every = every
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self.samples += 1
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def child(pool: str, model: str, out: str, mode: str, shard_size: int, budget: str) -> dict:
    """One select run in this (fresh) process: its RSS from before the command to the end."""
    import gc

    import torch

    torch.set_num_threads(1)
    from mechsieve.cli import main

    def select(path: str, folder: str) -> None:
        code = main(["select", "--method", "loss", "--pool", path, "--model", model, "--device", "cpu",
                     "--budget", budget, "--shard-size", str(shard_size), "--out", folder, "--quiet",
                     "--stream" if mode == "stream" else "--no-stream"])
        if code != 0:
            raise SystemExit(f"select exited {code}")

    # the same command on 16 examples first: its imports and first allocations are not the pool's
    warm = Path(out).with_name(Path(out).name + "-warmup")
    select(str(write_pool(warm.with_suffix(".jsonl"), 16)), str(warm))
    gc.collect()
    mb = 2**20
    with RssSampler() as sampler:
        time.sleep(0.05)
        baseline = sampler.rss()
        sampler.peak = baseline
        t0 = time.perf_counter()
        select(pool, out)
        wall = time.perf_counter() - t0
    return {"mode": mode, "baseline_mb": round(baseline / mb, 1), "peak_mb": round(sampler.peak / mb, 1),
            "peak_minus_baseline_mb": round((sampler.peak - baseline) / mb, 1),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "samples": sampler.samples, "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="pool sizes, comma-separated")
    ap.add_argument("--modes", default="memory,stream", help="memory (--no-stream), stream (--stream)")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--budget", default="0.1")
    ap.add_argument("--child", nargs=4, metavar=("POOL", "MODEL", "OUT", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.shard_size, args.budget)))
        return
    import numpy as np
    import pyarrow.parquet as pq

    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = Results("stream_memory", "stream_memory", model=MODEL)
    results.set("settings", {"method": "loss", "budget": args.budget, "shard_size": args.shard_size,
                             "executor": "local", "sampling": "/proc/self/statm every 5 ms",
                             "example": example(12345)})
    memory = results.phase("memory")
    memory["runs"] = []
    with tempfile.TemporaryDirectory(prefix="stream-memory-") as tmp:
        root = Path(tmp)
        model = build_model(root / "model")
        env = {**os.environ, "MECHSIEVE_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
        for n in sizes:
            pool = write_pool(root / f"pool-{n}.jsonl", n)
            scores = {}
            for mode in modes:
                out = root / f"out-{n}-{mode}"
                print(f"{n} examples, {mode}", flush=True)
                proc = subprocess.run([sys.executable, __file__, "--child", str(pool), str(model), str(out), mode,
                                       "--shard-size", str(args.shard_size), "--budget", args.budget],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"{n} {mode}: child failed\n{proc.stderr[-3000:]}")
                run = {"examples": n, "pool_mb": round(pool.stat().st_size / 2**20, 2),
                       **json.loads(proc.stdout.strip().splitlines()[-1])}
                memory["runs"].append(run)
                scores[mode] = pq.read_table(out / "scores.parquet").column("score").to_numpy()
                print(f"  peak - baseline {run['peak_minus_baseline_mb']} MB in {run['wall_s']} s", flush=True)
                results.save()
            if len(scores) == 2:
                a, b = scores.values()
                memory.setdefault("same_scores", {})[str(n)] = bool(np.array_equal(a, b, equal_nan=True))
    by = {(r["mode"], r["examples"]): r["peak_minus_baseline_mb"] for r in memory["runs"]}
    lo, hi = min(sizes), max(sizes)
    memory["growth_mb"] = {m: round(by[(m, hi)] - by[(m, lo)], 1) for m in modes}
    memory["note"] = (f"growth_mb: peak minus baseline at {hi} examples less that at {lo}; flat means the driver "
                      "does not grow with the pool (a streamed pool keeps its ids and scores: tens of bytes each)")
    results.save(finished="memory")
    print("driver peak - baseline: " + "; ".join(
        f"{m} " + ", ".join(f"{n}: {by[(m, n)]} MB" for n in sizes) + f" (growth {memory['growth_mb'][m]} MB)"
        for m in modes) + f"; same scores {memory.get('same_scores')} -> {results.path}")


if __name__ == "__main__":
    main()
