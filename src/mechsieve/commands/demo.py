"""`mechsieve demo`: the pipeline, small, on the embedded default model, offline.

Steps: load; read the bundled samples into one mixed pool (sources kept); capture; select 10% for
GSM8K with NAIT and at random; XTF token masks; IGDS task features (where the robust recipe
stops, it says so and goes on with keep=top); the closed loop (LoRA on the NAIT and the random
selection, same size and steps, held-out loss on GSM8K test answers); attribution (`mechsieve
attribute` with the vector filter on a small code pool with a planted behaviour); the HTML report.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path
from typing import Any

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
    folder.claim(["pool.jsonl", "capture", "select-nait", "select-random", "select-igds", "sae", "mask-tokens",
                  "loop", "attribute", "report.html"])
    mbpp = read_pool(sample_path("mbpp.jsonl"), field_map={"prompt": "text", "response": "code", "id": "task_id"},
                     source="mbpp")
    pool.examples += mbpp.examples
    # one file holds the mixed pool, so every run folder records a pool path that has all its texts
    # (`mechsieve report` re-reads it); each record keeps its `source`, which the reader takes back
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
    selections, selection_outputs = select_step(loaded, pool, out, args.quiet)
    mask_outputs = mask_tokens_step(loaded, pool, out, args.quiet)
    igds_outputs = igds_step(loaded, pool, out, args.quiet)
    loop_outputs = loop_step(loaded, pool, selections, out, args.model, args.quiet)
    attribute_outputs, code_pool = attribute_step(args.model, out, args.quiet)
    folders = [out / "select-nait", out / "select-random", *([out / "select-igds"] if igds_outputs else []),
               out / "mask-tokens", out / "loop", out / "attribute"]
    report = report_step(out, folders, pools=[pool, code_pool], tokenizer=loaded.tokenizer)
    folder.finish()
    print(f"done in {time.perf_counter() - t0:.1f} s")
    print_outputs({"activations": out / "capture" / "activations.safetensors",
                   "settings": out / "capture" / "activations.json", **selection_outputs, **mask_outputs,
                   **igds_outputs, **loop_outputs, **attribute_outputs, "report": report})
    return 0


# --- step: targeted selection (NAIT vs random), appended by the selection stage ----------------
NAIT_SETTINGS = {"render": {"max_len": 256}}
"""The demo's NAIT settings (the robust preset's defaults otherwise); the closed loop records them."""


def select_step(loaded, pool, out: Path, quiet: bool) -> tuple[dict, dict[str, Path]]:
    """Select 10% of the mixed pool for GSM8K with NAIT and at random; print the per-source counts.
    Returns the selections by method (the closed loop trains on them) and the files written."""
    from mechsieve.data.readers import read_pool
    from mechsieve.select import select_examples, write_selection

    target = read_pool(sample_path("gsm8k_target.jsonl"), source="gsm8k_target")
    print(f"[4] selecting 10% of the {len(pool)} examples for GSM8K (target: {len(target)} other GSM8K "
          "problems) with NAIT (residual drift from the user's question, layers chosen by how well they tell "
          "the target from the pool) and at random")
    outputs: dict[str, Path] = {}
    selections = {}
    rows = []
    for method in ("nait", "random"):
        sel = select_examples(method, pool, 0.1, target=target, loaded=loaded, seed=0,
                              settings=NAIT_SETTINGS if method == "nait" else None, progress=not quiet)
        paths = write_selection(pool, sel, out / f"select-{method}")
        outputs[f"{method} subset"] = paths["subset"]
        outputs[f"{method} scores"] = paths["scores"]
        selections[method] = sel
        rows.append((method, sel.counts_by_source(pool), sel.timings.get("score_total", 0.0)))
    sources = list(pool.counts_by_source())
    print("      selected per source: " + "  ".join(f"{s:>12}" for s in sources))
    for method, counts, seconds in rows:
        print(f"      {method:<19}" + "  ".join(f"{counts[s]:>12}" for s in sources) + f"   ({seconds:.1f} s)")
    layers = selections["nait"].explanations.get("layers")
    if layers:
        print(f"      NAIT read blocks {', '.join(map(str, layers))}")
    return selections, outputs


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
IGDS_SETTINGS = {"render": {"max_len": 128}, "top_k": 8, "freq_threshold": 0.3, "dev_size": 4, "alphas": [4.0],
                 "snippets": 2, "keep_top": 4,
                 "train": {"d_sae": 512, "k": 16, "buffer_tokens": 4096, "batch_size": 128, "holdout": 0.1}}
"""IGDS sized for a demo (robust preset otherwise): 8 candidates, 1 steering factor, 4 dev answers."""


def igds_fallback(message: str, overrides: dict) -> tuple[str, dict] | None:
    """What the demo does when IGDS stops (ScorerError `message`): (the line that says so, the
    settings it goes on with), or None when there is nothing left to try."""
    why = message.removeprefix("igds: ").split(". Stopping")[0].split("; ")[0]
    if "none_kept" in message and overrides.get("keep") != "top":
        return (f"IGDS stopped (robust default none_kept=stop): {why}; going on with --set scorer.keep=top "
                f"(the {IGDS_SETTINGS['keep_top']} best by delta, marked below)", {"keep": "top"})
    if "frequency recall" in message and overrides.get("reference") != "none":
        return (f"IGDS stopped: {why}; going on with --set scorer.reference=none (no pool contrast) and "
                "--set scorer.keep=top", {"reference": "none", "keep": "top"})
    return None


def igds_step(loaded, pool, out: Path, quiet: bool) -> dict[str, Path]:
    """Train a tiny TopK SAE on the samples (middle block), find GSM8K task features with IGDS
    (recall on the target against the pool, template check, steering against random-direction
    controls on 4 dev answers) and select 10% by FRS. Where the robust recipe stops (on 4 dev
    answers no latent's steering may beat its controls), say so and go on with keep=top; the SAE
    is saved once (OUT/sae) and reused by the second try."""
    from mechsieve.data.readers import read_pool
    from mechsieve.scorers.base import ScorerError
    from mechsieve.select import select_examples, write_selection

    target = read_pool(sample_path("gsm8k_target.jsonl"), source="gsm8k_target")
    print(f"[6] IGDS: training a small TopK SAE (512 latents, k 16) on the residual stream of the middle block "
          f"over these {len(pool) + len(target)} examples, then recall (against the pool, template latents "
          "dropped) / steering against random directions / FRS for GSM8K (sized for a demo: 8 candidates, "
          "1 steering factor, 4 dev answers)")
    overrides: dict = {}
    while True:
        try:
            sel = select_examples("igds", pool, 0.1, target=target, loaded=loaded, seed=0,
                                  settings={**IGDS_SETTINGS, "save_sae": str(out / "sae"), **overrides},
                                  progress=not quiet)
            break
        except ScorerError as err:
            fix = igds_fallback(str(err), overrides)
            if fix is None:
                print(f"      IGDS skipped: {err}")
                return {}
            print(f"      {fix[0]}")
            overrides.update(fix[1])
    paths = write_selection(pool, sel, out / "select-igds")
    print_igds(sel, pool)
    return {"igds subset": paths["subset"], "igds summary (feature table)": paths["summary"]}


def print_igds(sel, pool) -> None:
    """The SAE, the recall funnel and template check, and each kept latent: recall frequency (on
    the target, on the pool), template share, steering delta against its controls, top tokens."""
    ex = sel.explanations
    r = ex.get("sae_training") or {}
    if r:
        print(f"      SAE at block {ex['layer']}: held-out FVU {r.get('heldout_fvu')}, dead latents "
              f"{r.get('heldout_dead_share')}, trained on {r.get('train_tokens')} tokens in {r.get('train_seconds')} s"
              + (" (reused)" if r.get("reused") else ""))
    recall = ex.get("recall") or {}
    funnel = " -> ".join(f"{k} {v}" for k, v in (recall.get("funnel") or {}).items())
    if funnel:
        print(f"      recall: latents passing each test: {funnel} (reference: {recall.get('reference')}, "
              f"{recall.get('reference_examples')} examples)")
    template = recall.get("template") or {}
    dropped = template.get("dropped") or []
    if template:
        limit = f"more than {template.get('threshold', 0.5):.0%} of their top activations on chat-template tokens"
        shown = ", ".join(f"{d['feature']} ({d['template_share']:.0%})" for d in dropped[:6])
        print(f"      template check: dropped {len(dropped)} of the top latents, {limit}: {shown}" if dropped else
              f"      template check: none of the top latents has {limit}")
    filtering = {row["feature"]: row for row in (ex.get("filtering") or {}).get("candidates", [])}
    print(f"      {len(ex['candidates'])} recalled latents, {len(ex['kept'])} kept (base dev loss "
          f"{ex['base_dev_metric']}{', none improved it: kept the best' if ex['fallback'] else ''}):")
    source_of = {e.id: e.source for e in pool.examples}
    for row in ex["features"]:
        share = row.get("template_share")
        q = row.get("control_q")
        steer = f"delta {signed(row['delta'])}" if "delta" in row else "not steered"
        if q is not None:
            steer += f" vs controls {signed(q)}"
        if "(keep=top)" in str(filtering.get(row["feature"], {}).get("why", "")):
            steer += " (kept by keep=top)"
        tokens = ", ".join(f"{snippet_token(sn['text'])!r} [{source_of.get(sn['id'], '?')}]"
                           for sn in row.get("snippets") or [])
        print(f"        latent {row['feature']:>4}  freq {row['freq']:.2f}"
              + (f" (pool {row['contrast_freq']:.2f})" if "contrast_freq" in row else "")
              + (f"  template {share:.0%}" if share is not None else "") + f"  {steer}  top tokens: {tokens or '-'}")
        if row.get("snippets"):
            print(f"              ...{row['snippets'][0]['text'][-70:]}")
    counts = sel.counts_by_source(pool)
    print("      selected per source: " + ", ".join(f"{s} {c}" for s, c in counts.items())
          + f" ({sel.timings.get('score_total', 0.0):.1f} s)")


def signed(value: float) -> str:
    """A steering delta with its sign, three significant digits (0 as 0)."""
    return f"{value:+.3g}" if value else "0"


def snippet_token(text: str) -> str:
    """The marked token of an IGDS snippet (`...left[[token]]right`)."""
    start, end = text.find("[["), text.rfind("]]")
    return text[start + 2:end] if 0 <= start < end else text


# --- step: the closed loop (fine-tune on each selection, held-out loss) -------------------------
LOOP_STEPS = 8
"""Optimizer steps of each demo fine-tune (the same for every selection)."""


def loop_step(loaded, pool, selections: dict, out: Path, model_name: str, quiet: bool) -> dict[str, Path]:
    """Fine-tune LoRA on the NAIT selection and on the random one (same size, same steps, same
    seed) and compare the loss per answer token on GSM8K test problems that are in neither the pool
    nor the target. Writes OUT/loop as `mechsieve experiment` writes its folder (results.json with
    the settings that reproduce it under `mechsieve experiment`), which the report shows."""
    import copy
    import gc

    import numpy as np

    from mechsieve.data.readers import DataConfig
    from mechsieve.data.render import RenderConfig
    from mechsieve.evaluate.tasks import TaskConfig, evaluate_task
    from mechsieve.experiment import ExperimentConfig
    from mechsieve.experiment.report import write_results
    from mechsieve.models.loading import LoadedModel, ModelConfig
    from mechsieve.train import TrainConfig, items_from_examples, train

    render = RenderConfig(max_len=384)  # every held-out answer whole (the longest renders to 333 SmolLM2 tokens)
    task = TaskConfig(task="loss", data=DataConfig(path=str(sample_path("gsm8k_heldout.jsonl"))),
                      name="gsm8k_heldout")
    train_cfg = TrainConfig(learning_rate=1e-3, max_steps=LOOP_STEPS, max_tokens=512, logging_steps=0, seed=0)
    sizes = {m: int(sel.selected.sum()) for m, sel in selections.items()}
    print(f"[7] closed loop: LoRA (rank {train_cfg.lora_r}, learning rate {train_cfg.learning_rate:g}) for "
          f"{LOOP_STEPS} steps of up to {train_cfg.max_tokens} tokens on each {sizes['nait']}-example selection "
          "(NAIT, random), then the loss per answer token on 16 GSM8K test answers (in neither pool nor target)")
    items = items_from_examples(pool.examples, loaded.tokenizer, render)
    key = f"{task.label()}/loss_per_token"
    base = evaluate_task(loaded, task, render, progress=not quiet)
    rows = [{"method": "base", "seed": None, "selected": 0, "steps": 0, "train_tokens": 0, "train_seconds": 0.0,
             "select_seconds": 0.0, "eval_seconds": base["seconds"], "final_train_loss": None,
             **{f"{task.label()}/{k}": v for k, v in base["metrics"].items()}}]
    print(f"      {'base (not fine-tuned)':<24}{base['metrics']['loss_per_token']:.4f}   on "
          f"{base['metrics']['tokens']} answer tokens")
    for method in ("nait", "random"):
        sel = selections[method]
        chosen = [int(i) for i in np.flatnonzero(sel.selected)]
        tuned = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.identity, loaded.config)
        res = train(tuned, [items[i] for i in chosen], train_cfg, progress=not quiet)
        ev = evaluate_task(tuned, task, render, progress=not quiet)
        del tuned
        gc.collect()
        rows.append({"method": method, "seed": 0, "selected": len(chosen), "steps": res.steps,
                     "train_tokens": res.tokens, "train_seconds": round(res.seconds, 3),
                     "select_seconds": round(float(sel.timings.get("score_total", 0.0)), 3),
                     "eval_seconds": ev["seconds"], "final_train_loss": res.loss_curve[-1],
                     **{f"{task.label()}/{k}": v for k, v in ev["metrics"].items()}})
        by_source = ", ".join(f"{s} {c}" for s, c in sel.counts_by_source(pool).items() if c)
        print(f"      {method:<24}{ev['metrics']['loss_per_token']:.4f}   after {res.steps} steps on {len(chosen)} "
              f"examples ({by_source}; {res.tokens} answer tokens, {res.seconds:.0f} s)")
    gap = rows[1][key] - rows[2][key]
    print(f"      held-out loss, NAIT's selection minus random's: {gap:+.4f} per token ({'lower' if gap < 0 else 'not lower'}"
          "; one seed at demo size shows the loop, not which method is better: `mechsieve experiment` runs seeds)")
    cfg = ExperimentConfig(model=ModelConfig(name=model_name), pool=DataConfig(path=str(out / "pool.jsonl")),
                           target=DataConfig(path=str(sample_path("gsm8k_target.jsonl")), source="gsm8k_target"),
                           methods=["nait", "random"], method_settings={"nait": NAIT_SETTINGS}, budget=0.1, seeds=[0],
                           train=train_cfg, steps=LOOP_STEPS, render=render, eval=[task], out=str(out / "loop"))
    written = write_results(cfg, rows, {"written_by": "mechsieve demo", "steps": LOOP_STEPS, "steps_from": "steps",
                                        "pool": {"path": str(out / "pool.jsonl"), "examples": len(pool),
                                                 "fingerprint": pool.fingerprint()},
                                        "eval_data": {task.label(): base["fingerprint"]}, "model": loaded.identity})
    return {"closed loop (results.json)": written["results"]}


# --- step: attribution (vector filter on a planted behaviour) ----------------------------------
def attribute_step(model: str, out: Path, quiet: bool) -> tuple[dict[str, Path], Any]:
    """`mechsieve attribute` itself on the bundled chmod pool (data/samples/README.md): 40 code
    answers in one template family, 8 of which set a file world-writable (0o777) while the others
    are the same kind of answer with 0o700; the concept from 12 other prompts answered both ways,
    at the block the probe gate picks. Prints the command, then what it printed (AUC-PR of the
    planted answers beside the prompt-only baseline). Returns its files and the pool (the report
    shows its texts)."""
    from mechsieve.cli import main
    from mechsieve.data.readers import read_pool

    data = sample_path("chmod_pool.jsonl")
    argv = ["attribute", "--data", str(data), "--concept", str(sample_path("chmod_insecure.jsonl")),
            str(sample_path("chmod_secure.jsonl")), "--concept-layer", "auto", "--label-field", "planted",
            "--model", model, "--out", str(out / "attribute"), "--overwrite", *(["--quiet"] if quiet else [])]
    print("[8] attribution: which training answers drive insecure code? The vector filter ranks 40 code answers "
          "(8 set a file world-writable) by an insecure-vs-patched concept, through")
    print("      mechsieve " + " ".join(argv))
    if main(argv) != 0:
        raise RuntimeError("the demo's attribute step failed (its message is above)")
    return ({"attribution ranking": out / "attribute" / "ranking.jsonl"},
            read_pool(data))


# --- step: the HTML report over the folders above, appended by the report stage -----------------
def report_step(out: Path, folders: list[Path], pools: list | None = None, tokenizer=None) -> Path:
    """Write one self-contained HTML page over the demo's run folders and say where it is."""
    from mechsieve.report import build_report

    path = build_report(folders, out / "report.html", pools=pools, tokenizer=tokenizer, title="mechsieve demo")
    print(f"[9] report of the {len(folders)} runs above (score distributions, IGDS features, token masks, the "
          f"closed loop, the attribution ranking): open {path} in a browser (works offline)")
    return path
