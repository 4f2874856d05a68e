"""`mechsieve demo`: the pipeline, small, on the embedded default model, offline."""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

NAME = "demo"
HELP = "run mechsieve end to end on bundled samples with the embedded SmolLM2 model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model (default: the embedded SmolLM2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def sample_path(name: str) -> Path:
    return Path(str(resources.files("mechsieve.data") / "samples" / name))


def run(args: argparse.Namespace) -> int:
    from mechsieve.capture.activations import CaptureConfig, capture_pool
    from mechsieve.commands._common import print_outputs
    from mechsieve.data.readers import read_examples, read_pool
    from mechsieve.data.render import RenderConfig
    from mechsieve.models.hooks import describe
    from mechsieve.models.loading import load_model

    out = Path(args.out)
    t0 = time.perf_counter()
    print(f"[1/3] loading {args.model} (converted once from the packaged GGUF, then cached)")
    loaded = load_model(args.model)
    info = describe(loaded.model)
    print(f"      {info['model_type']}: {info['n_layers']} blocks, d_model {info['d_model']}, "
          f"d_mlp {info['d_mlp']}, {info['parameters'] / 1e6:.0f}M parameters, on {loaded.device} "
          f"({loaded.identity['dtype']}) in {time.perf_counter() - t0:.1f} s")
    print("[2/3] reading the bundled samples (GSM8K, MBPP, MedQA; see data/samples/README.md)")
    pool = read_examples([str(sample_path("gsm8k_train.jsonl")), str(sample_path("medqa.jsonl"))])
    mbpp = read_pool(sample_path("mbpp.jsonl"), field_map={"prompt": "text", "response": "code", "id": "task_id"},
                     source="mbpp")
    pool.examples += mbpp.examples
    for source, count in pool.counts_by_source().items():
        print(f"      {source:<14} {count:>4} examples")
    print("[3/3] capturing the residual stream (mean over response, last prompt token, drift) at 4 layers")
    cfg = CaptureConfig(layers=[0, 9, 19, -1], reductions=["mean_response", "last_prompt", "drift"])
    result, report = capture_pool(loaded, pool, cfg, RenderConfig(max_len=256), out_dir=out / "capture",
                                  progress=not args.quiet)
    s = result.summary()
    print(f"      {report['render']}")
    if report.get("cached"):
        print("      (reused a finished capture with the same settings)")
    else:
        print(f"      {s['tokens']} tokens in {s['seconds']} s = {s['tokens_per_s']} tok/s, "
              f"{s['batches']} batches, padding efficiency {s['padding_efficiency']}")
    arr = result.arrays["mean_response"]
    sources = [ex.source for ex in pool.examples]
    print("      mean-response residual norm at the last captured layer, by source:")
    for source in dict.fromkeys(sources):
        rows = [i for i, s_ in enumerate(sources) if s_ == source]
        norms = (arr[rows, -1] ** 2).sum(-1) ** 0.5
        print(f"        {source:<14} {norms.mean():8.2f}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    print_outputs({"activations": out / "capture" / "activations.safetensors",
                   "settings": out / "capture" / "activations.json"})
    return 0
