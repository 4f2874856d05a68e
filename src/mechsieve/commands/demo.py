"""`mechsieve demo`: the pipeline, small, on the embedded default model, offline."""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

NAME = "demo"
HELP = "run mechsieve end to end on bundled samples with the embedded SmolLM2 model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "--output_dir", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model (default: the embedded SmolLM2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def sample_path(name: str) -> Path:
    return Path(str(resources.files("mechsieve.data") / "samples" / name))


def run(args: argparse.Namespace) -> int:
    from mechsieve.capture.activations import CaptureConfig, capture_pool
    from mechsieve.commands._common import print_outputs
    from mechsieve.data.readers import read_examples, read_pool
    from mechsieve.data.render import RenderConfig
    from mechsieve.data.writers import example_to_messages, write_jsonl
    from mechsieve.models.hooks import describe
    from mechsieve.models.loading import load_model
    from mechsieve.store.outputs import OutputFolder

    # the demo reuses its finished capture: its own folder needs no --overwrite
    folder = OutputFolder(args.out, NAME, resumes=True)
    out = Path(args.out)
    t0 = time.perf_counter()
    print(f"[1] loading {args.model} (converted once from the packaged GGUF, then cached)")
    loaded = load_model(args.model)
    info = describe(loaded.model)
    print(f"      {info['model_type']}: {info['n_layers']} blocks, d_model {info['d_model']}, "
          f"d_mlp {info['d_mlp']}, {info['parameters'] / 1e6:.0f}M parameters, on {loaded.device} "
          f"({loaded.identity['dtype']}) in {time.perf_counter() - t0:.1f} s")
    print("[2] reading the bundled samples (GSM8K, MBPP, MedQA; see data/samples/README.md)")
    pool = read_examples([str(sample_path("gsm8k_train.jsonl")), str(sample_path("medqa.jsonl"))])
    folder.claim(["pool.jsonl", "capture", "select-nait", "select-random", "select-igds", "mask-tokens",
                  "report.html"])
    mbpp = read_pool(sample_path("mbpp.jsonl"), field_map={"prompt": "text", "response": "code", "id": "task_id"},
                     source="mbpp")
    pool.examples += mbpp.examples
    # one file holds the mixed pool, so every run folder records a pool path that has all its texts
    # (`mechsieve report` re-reads it)
    pool = read_pool(write_jsonl(out / "pool.jsonl", [example_to_messages(ex) for ex in pool.examples]))
    for source, count in pool.counts_by_source().items():
        print(f"      {source:<14} {count:>4} examples")
    print("[3] capturing the residual stream (mean over response, last prompt token, drift) at 4 layers")
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
    selection_outputs = select_step(loaded, pool, out, args.quiet)
    mask_outputs = mask_tokens_step(loaded, pool, out, args.quiet)
    igds_outputs = igds_step(loaded, pool, out, args.quiet)
    folders = [out / "select-nait", out / "select-random", out / "select-igds", out / "mask-tokens"]
    report = report_step(out, folders, pools=[pool], tokenizer=loaded.tokenizer)
    folder.finish()
    print(f"done in {time.perf_counter() - t0:.1f} s")
    print_outputs({"activations": out / "capture" / "activations.safetensors",
                   "settings": out / "capture" / "activations.json", **selection_outputs, **mask_outputs,
                   **igds_outputs, "report": report})
    return 0


# --- step: targeted selection (NAIT vs random), appended by the selection stage ----------------
def select_step(loaded, pool, out: Path, quiet: bool) -> dict[str, Path]:
    """Select 10% of the mixed pool for GSM8K with NAIT and at random; print the per-source counts."""
    from mechsieve.data.readers import read_pool
    from mechsieve.select import select_examples, write_selection

    target = read_pool(sample_path("gsm8k_target.jsonl"), source="gsm8k_target")
    print(f"[4] selecting 10% of the {len(pool)} examples for GSM8K (target: {len(target)} other GSM8K "
          "problems) with NAIT (residual drift, all layers) and at random")
    settings = {"render": {"max_len": 256}}
    outputs: dict[str, Path] = {}
    rows = []
    for method in ("nait", "random"):
        sel = select_examples(method, pool, 0.1, target=target, loaded=loaded, seed=0,
                              settings=settings if method == "nait" else None, progress=not quiet)
        paths = write_selection(pool, sel, out / f"select-{method}")
        outputs[f"{method} subset"] = paths["subset"]
        outputs[f"{method} scores"] = paths["scores"]
        rows.append((method, sel.counts_by_source(pool), sel.timings.get("score_total", 0.0)))
    sources = list(pool.counts_by_source())
    print("      selected per source: " + "  ".join(f"{s:>12}" for s in sources))
    for method, counts, seconds in rows:
        print(f"      {method:<19}" + "  ".join(f"{counts[s]:>12}" for s in sources) + f"   ({seconds:.1f} s)")
    return outputs


# --- step: token masks (XTF), appended by the token-masking stage -------------------------------
def mask_tokens_step(loaded, pool, out: Path, quiet: bool) -> dict[str, Path]:
    """Mask noisy tokens of the GSM8K answers with XTF; show one answer with its masked tokens."""
    from mechsieve.data.render import RenderConfig
    from mechsieve.tokens import XtfConfig, mask_examples, write_masked
    from mechsieve.tokens.summary import marked_response

    examples = [ex for ex in pool.examples if ex.source == "gsm8k_train"] or pool.examples[:32]
    print(f"[5] masking noisy answer tokens of {len(examples)} GSM8K examples with XTF (reasoning "
          "importance, knowledge novelty, task relevance to the built-in math word list)")
    run = mask_examples(loaded, examples, XtfConfig(domain="math"), RenderConfig(max_len=256), progress=not quiet)
    summary = write_masked(out / "mask-tokens", run, loaded.tokenizer,
                           {"demo": True, "domain": "math", "model": loaded.identity})
    shares = ", ".join(f"{k} {v:.1%}" for k, v in summary["masked_share"].items())
    print(f"      masked {summary['masked_tokens']['union']} of {summary['eligible_tokens']} answer tokens "
          f"({shares}) in {run.seconds} s")
    i = max(range(len(examples)), key=lambda k: int(run.masks.masks[k].sum()))
    print(f"      example {examples[i].id}, masked tokens as [[token]]^why (R=attention received, "
          "K=already known, T=off-domain):")
    text = marked_response(loaded.tokenizer, run.rendered[i], run.masks.reasons[i])
    for line in text.splitlines():
        print(f"        {line}")
    return {"token masks": out / "mask-tokens", "mask summary": out / "mask-tokens" / "summary.json"}


# --- step: SAE task features (IGDS), appended by the SAE stage ----------------------------------
def igds_step(loaded, pool, out: Path, quiet: bool) -> dict[str, Path]:
    """Train a tiny TopK SAE on the samples (middle block), find GSM8K task features with IGDS
    (recall on the target prompts, one steering factor on 4 dev answers) and select 10% by FRS."""
    from mechsieve.data.readers import read_pool
    from mechsieve.select import select_examples, write_selection

    target = read_pool(sample_path("gsm8k_target.jsonl"), source="gsm8k_target")
    print(f"[6] IGDS: training a small TopK SAE (512 latents, k 16) on the residual stream of the middle block "
          f"over these {len(pool) + len(target)} examples, then recall / steering / FRS for GSM8K (sized for a "
          "demo: 8 candidates, 1 steering factor, 4 dev answers)")
    settings = {"render": {"max_len": 128}, "top_k": 8, "freq_threshold": 0.3, "dev_size": 4, "alphas": [4.0],
                "snippets": 1, "train": {"d_sae": 512, "k": 16, "buffer_tokens": 4096, "batch_size": 128,
                                         "holdout": 0.1}}
    sel = select_examples("igds", pool, 0.1, target=target, loaded=loaded, seed=0, settings=settings,
                          progress=not quiet)
    paths = write_selection(pool, sel, out / "select-igds")
    ex = sel.explanations
    r = ex["sae_training"]
    print(f"      SAE at block {ex['layer']}: held-out FVU {r['heldout_fvu']}, dead latents {r['heldout_dead_share']}, "
          f"trained on {r['train_tokens']} tokens in {r['train_seconds']} s")
    print(f"      {len(ex['candidates'])} recalled latents, {len(ex['kept'])} kept by steering (base dev loss "
          f"{ex['base_dev_metric']}{', none improved it: kept the best' if ex['fallback'] else ''}):")
    for row in ex["features"]:
        snip = row["snippets"][0]["text"][-60:] if row["snippets"] else ""
        print(f"        latent {row['feature']:>4}  freq {row['freq']:.2f}  delta {row['delta']:+.4f}  "
              f"top pool snippet: {snip}")
    counts = sel.counts_by_source(pool)
    print("      selected per source: " + ", ".join(f"{s} {c}" for s, c in counts.items())
          + f" ({sel.timings.get('score_total', 0.0):.1f} s)")
    return {"igds subset": paths["subset"], "igds summary (feature table)": paths["summary"]}


# --- step: the HTML report over the folders above, appended by the report stage -----------------
def report_step(out: Path, folders: list[Path], pools: list | None = None, tokenizer=None) -> Path:
    """Write one self-contained HTML page over the demo's run folders and say where it is."""
    from mechsieve.report import build_report

    path = build_report(folders, out / "report.html", pools=pools, tokenizer=tokenizer, title="mechsieve demo")
    print(f"[7] report of the {len(folders)} runs above (score distributions, IGDS features, token masks): "
          f"open {path} in a browser (works offline)")
    return path
