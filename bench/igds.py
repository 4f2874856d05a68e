"""IGDS benchmarks: the SAE it needs (FVU, dead latents, training time), IGDS in B1 (GSM8K share
of a 10% selection from the mixed pool, held-out loss after LoRA), and B1b (within GSM8K: IGDS
top 50% vs random 50% x 3 seeds vs full, one epoch each; held-out loss and exact match).

SmolLM2-135M-Instruct has no public SAE, so phase `sae` trains a TopK SAE on the residual output
of block `--layer` from `--sae-examples` examples (half GSM8K train, half the other B1 sources,
none of them in the B1 / B1b pools), streamed, and saves it under runs/bench/igds_sae (reused by
the later phases when the settings match). The B1 pool comes from bench/targeted_selection.py
(`build_pool`, imported, not copied).

    flock /tmp/mechsieve-bench.lock python bench/igds.py --phase sae
    flock /tmp/mechsieve-bench.lock python bench/igds.py --phase b1
    flock /tmp/mechsieve-bench.lock python bench/igds.py --phase b1b
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import numpy as np

from _common import command_line

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
OUT_JSON = RESULTS / "igds.json"
SAE_DIR = ROOT / "runs" / "bench" / "igds_sae"
MODEL = "smollm2-135m-instruct"


def b1_module():
    """bench/targeted_selection.py as a module (its pool builder and source readers)."""
    spec = importlib.util.spec_from_file_location("targeted_selection", ROOT / "bench" / "targeted_selection.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def b1b_split(seed: int, n_pool: int, n_target: int):
    """B1b: `n_pool` GSM8K train problems and `n_target` others as the IGDS target (seeded)."""
    from mechsieve.data import Pool, read_pool

    rows = read_pool(DATA / "gsm8k" / "train.jsonl", source="gsm8k").examples
    perm = np.random.default_rng(seed).permutation(len(rows))
    return (Pool([rows[i] for i in sorted(perm[:n_pool])], "b1b", "memory", "question_answer"),
            Pool([rows[i] for i in sorted(perm[n_pool:n_pool + n_target])], "b1b-target", "memory",
                 "question_answer"))


def sae_examples(args):
    """Examples for SAE training: half GSM8K train, half spread over B1's other sources, none of
    them in the B1 pool / target or the B1b pool / target."""
    b1 = b1_module()
    pool, target = b1.build_pool(args.per_source, args.target, args.seed)
    used = {(ex.source, ex.id.split(":", 1)[1]) for ex in pool.examples}
    used |= {(ex.source, ex.id) for ex in target.examples}
    for part in b1b_split(args.seed, args.b1b_pool, args.target):
        used |= {(ex.source, ex.id) for ex in part.examples}
    rng = np.random.default_rng(args.seed + 1000)
    out = []
    others = [s for s in b1.SOURCES if s != "gsm8k"]
    for name in b1.SOURCES:
        want = args.sae_examples // 2 if name == "gsm8k" else (args.sae_examples // 2) // len(others)
        rows = [ex for ex in b1.read_source(name) if (ex.source, ex.id) not in used]
        out += [rows[i] for i in sorted(rng.permutation(len(rows))[:want])]
    return out


def phase_sae(args, loaded) -> dict:
    from mechsieve.data import Pool, RenderConfig
    from mechsieve.data.records import make_unique_ids
    from mechsieve.features.sae import load_sae
    from mechsieve.features.sae_train import SaeTrainConfig, sae_settings, save_sae, train_sae
    from mechsieve.store.artefacts import SettingsMismatch, load_artefact

    examples = sae_examples(args)
    make_unique_ids(examples)
    pool = Pool(examples, "bench-igds-sae", "memory", "mixed")
    cfg = SaeTrainConfig(d_sae=args.d_sae, k=args.k, epochs=args.sae_epochs, holdout=0.1, seed=args.seed)
    render_cfg = RenderConfig(max_len=args.max_len)
    settings = sae_settings(loaded, args.layer, cfg, render_cfg, pool.fingerprint())
    try:
        _, meta = load_artefact(SAE_DIR, "mechsieve_sae", expected=settings)
        print(f"[sae] reusing {SAE_DIR}")
        report = meta["report"]
    except (FileNotFoundError, SettingsMismatch):
        trained = train_sae(loaded, pool.examples, args.layer, cfg, render_cfg, args.max_tokens,
                            progress=not args.quiet)
        save_sae(SAE_DIR, trained, settings)
        report = trained.report
    load_sae(SAE_DIR).check_model(loaded.model)
    return {"layer": args.layer, "d_sae": args.d_sae, "k": args.k, "examples": len(examples),
            "by_source": pool.counts_by_source(), "max_len": args.max_len, "folder": str(SAE_DIR),
            "report": report, "fvu_at_most_0.25": report["heldout_fvu"] <= 0.25}


def igds_settings(args) -> dict:
    return {"sae": str(SAE_DIR), "render": {"max_len": args.max_len}, "max_tokens": args.max_tokens,
            "top_k": args.top_k, "dev_size": args.dev_size, "alphas": [float(a) for a in args.alphas.split(",")]}


def lora_run(args, examples, heldout, label: str, steps: int = 0) -> dict:
    """LoRA from a fresh base model (one epoch, or `steps` optimizer steps); held-out loss and,
    with --exact-match, greedy exact match on the held-out problems."""
    from mechsieve.data import RenderConfig
    from mechsieve.evaluate import heldout_loss
    from mechsieve.models import load_model
    from mechsieve.train import TrainConfig, items_from_examples, train

    loaded = load_model(MODEL)
    out: dict = {"examples": len(examples)}
    if examples:
        cfg = TrainConfig(max_steps=steps, epochs=1.0, max_batch=args.train_batch,
                          max_tokens=args.train_batch * args.max_len, seed=args.seed, warmup_steps=2)
        result = train(loaded, items_from_examples(examples, loaded.tokenizer, RenderConfig(max_len=args.max_len)),
                       cfg, progress=not args.quiet)
        out.update(train_s=round(result.seconds, 1), steps=result.steps, train_tokens=result.tokens)
    h = heldout_loss(loaded.model, loaded.tokenizer, heldout, RenderConfig(max_len=512), progress=not args.quiet)
    out["heldout_loss"] = h["loss_per_token"]
    if args.exact_match:
        from mechsieve.evaluate.answers import exact_match
        from mechsieve.evaluate.generate import generate_greedy

        preds = generate_greedy(loaded.model, loaded.tokenizer, heldout, RenderConfig(max_len=512),
                                max_new_tokens=256, progress=not args.quiet)
        out["exact_match"] = float(np.mean([exact_match(p, ex.response) for p, ex in zip(preds, heldout)]))
    print(f"  [{label}] {out}", flush=True)
    return out


def heldout(n: int):
    from mechsieve.data import read_pool

    return read_pool(DATA / "gsm8k" / "test.jsonl", source="gsm8k_test", limit=n).examples


def phase_b1(args, loaded) -> dict:
    from mechsieve.select import select_examples

    b1 = b1_module()
    pool, target = b1.build_pool(args.per_source, args.target, args.seed)
    t0 = time.perf_counter()
    sel = select_examples("igds", pool, args.budget, target=target, loaded=loaded, seed=args.seed,
                          settings=igds_settings(args), progress=not args.quiet)
    wall = time.perf_counter() - t0
    counts = sel.counts_by_source(pool)
    share = counts.get("gsm8k", 0) / max(len(sel.ids), 1)
    out = {"pool": {"examples": len(pool), "by_source": pool.counts_by_source(), "target": len(target),
                    "fingerprint": pool.fingerprint()},
           "selected_by_source": counts, "share_gsm8k": share, "share_at_least_0.9": share >= 0.9,
           "wall_s": round(wall, 1), "timings": sel.timings, "features": sel.explanations["features"][:20],
           "kept": sel.explanations["kept"], "fallback": sel.explanations["fallback"]}
    if args.train:
        by_id = {ex.id: ex for ex in pool.examples}
        out["lora"] = lora_run(args, [by_id[i] for i in sel.ids], heldout(args.heldout), "b1 igds", args.steps)
    return out


def phase_b1b(args, loaded) -> dict:
    from mechsieve.select import select_examples

    pool, target = b1b_split(args.seed, args.b1b_pool, args.target)
    t0 = time.perf_counter()
    sel = select_examples("igds", pool, 0.5, target=target, loaded=loaded, seed=args.seed,
                          settings=igds_settings(args), progress=not args.quiet)
    out: dict = {"pool": len(pool), "target": len(target), "select_s": round(time.perf_counter() - t0, 1),
                 "kept": sel.explanations["kept"], "runs": {}}
    held = heldout(args.heldout)
    by_id = {ex.id: ex for ex in pool.examples}
    subsets = {"igds": sel.ids, **{f"random_seed{s}": select_examples("random", pool, 0.5, seed=s).ids
                                   for s in range(3)}, "full": [ex.id for ex in pool.examples], "base": []}
    for label, ids in subsets.items():
        out["runs"][label] = lora_run(args, [by_id[i] for i in ids], held, f"b1b {label}")
    rand = [out["runs"][f"random_seed{s}"]["heldout_loss"] for s in range(3)]
    out["random_mean_loss"], out["random_std_loss"] = float(np.mean(rand)), float(np.std(rand))
    out["igds_beats_random_mean_loss"] = out["runs"]["igds"]["heldout_loss"] < out["random_mean_loss"]
    out["igds_beats_full_loss"] = out["runs"]["igds"]["heldout_loss"] < out["runs"]["full"]["heldout_loss"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=["sae", "b1", "b1b", "all"], default="sae")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--sae-examples", type=int, default=400)
    p.add_argument("--sae-epochs", type=int, default=1)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=50, help="IGDS recall: candidate latents")
    p.add_argument("--dev-size", type=int, default=16, help="IGDS filtering: dev examples")
    p.add_argument("--alphas", default="2,5,10")
    p.add_argument("--per-source", type=int, default=100, help="B1 pool: examples per source")
    p.add_argument("--target", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--b1b-pool", type=int, default=600)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--steps", type=int, default=24, help="B1 LoRA optimizer steps (as B1's other methods)")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--no-train", dest="train", action="store_false", help="B1: selection only")
    p.add_argument("--exact-match", action="store_true", help="also greedy exact match on the held-out set (slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    import torch

    from mechsieve.models import load_model

    results = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    results.update({"benchmark": "IGDS (SAE, B1, B1b)", "machine": {"platform": platform.platform(),
                                                                   "torch_threads": torch.get_num_threads()},
                    "model": f"{MODEL} (float32, CPU)"})
    results.setdefault("commands", {})[args.phase] = command_line(__file__)
    RESULTS.mkdir(parents=True, exist_ok=True)
    loaded = load_model(MODEL)
    phases = ["sae", "b1", "b1b"] if args.phase == "all" else [args.phase]
    if "sae" not in phases:  # b1/b1b need the SAE: the one under runs/ when its settings match, else trained now
        results["sae"] = phase_sae(args, loaded)
    for phase in phases:
        t0 = time.perf_counter()
        results[phase] = {"sae": phase_sae, "b1": phase_b1, "b1b": phase_b1b}[phase](args, loaded)
        results[phase]["total_s"] = round(time.perf_counter() - t0, 1)
        OUT_JSON.write_text(json.dumps(results, indent=1) + "\n")
    s = results.get("sae", {}).get("report", {})
    line = (f"IGDS SAE layer {args.layer} d_sae {args.d_sae} k {args.k}: held-out FVU {s.get('heldout_fvu')}, "
            f"dead {s.get('heldout_dead_share')}, trained in {s.get('train_seconds')} s")
    if "b1" in results:
        line += f"; B1 GSM8K share {results['b1']['share_gsm8k']:.2f}"
    if "b1b" in results:
        line += "; B1b loss " + ", ".join(f"{k} {v['heldout_loss']:.4f}" for k, v in results["b1b"]["runs"].items())
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
