"""B3 token noise: does XTF find injected irrelevant spans, and does masking them help fine-tuning?

GSM8K train answers (first --n), a seeded 30% of them with 1-3 consecutive TinyStories sentences
inserted at the end of a random reasoning line; the injected tokens are recorded from the
tokenizer's character offsets. XTF scores every response token of SmolLM2-135M-Instruct once;
masks are then decided under several settings (paper defaults first) and compared with the
injected tokens: precision and recall per attribute and for the union, plus a threshold-free
ROC AUC of each raw score. Then LoRA on the masked vs the unmasked items, same steps and seeds,
a fresh base model per run; held-out loss on clean GSM8K test answers. float32 on CPU.

    flock /tmp/mechsieve-bench.lock python bench/token_noise.py --phase score
    flock /tmp/mechsieve-bench.lock python bench/token_noise.py --phase train   # bench/results/token_noise.json
"""

from __future__ import annotations

import argparse
import pickle
import time

import numpy as np

from harness import (
    ROOT,
    EvalSettings,
    Results,
    finetune_and_eval,
    heldout_gsm8k,
    read_source,
    spread,
)
from harness.pools import inject_spans, injected_tokens

CACHE = ROOT / "runs" / "bench_token_noise"


def pr(masked: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((masked & truth).sum())
    return {"masked": int(masked.sum()), "hits": tp,
            "precision": round(tp / masked.sum(), 4) if masked.sum() else None,
            "recall": round(tp / truth.sum(), 4) if truth.sum() else None}


def phase_score(args) -> None:
    from mechsieve.data import RenderConfig, render_pool
    from mechsieve.models import load_model
    from mechsieve.tokens.xtf import Xtf, XtfConfig

    loaded = load_model("smollm2-135m-instruct")
    examples, spans = inject_spans(read_source("gsm8k", limit=args.n), args.rate, args.seed)
    rendered, stats = render_pool(examples, loaded.tokenizer, RenderConfig(max_len=args.max_len))
    truth = [injected_tokens(loaded.tokenizer, ex, r, s) for ex, r, s in zip(examples, rendered, spans)]
    t0 = time.perf_counter()
    scores = Xtf(XtfConfig()).score(loaded.model, loaded.tokenizer, rendered, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "scores.pkl", "wb") as fh:
        pickle.dump({"examples": examples, "spans": spans, "rendered": rendered, "truth": truth,
                     "scores": scores, "seconds": seconds, "render": stats.summary(),
                     "args": vars(args)}, fh)
    print(f"scored {stats.tokens} tokens of {len(rendered)} examples in {seconds:.0f} s")


SETTINGS = {
    "paper_defaults": {},
    "caps_0.3": {"p_ri": 0.3, "p_kn": 0.3, "p_tr": 0.3},
    "tr_lowest": {"tr_cluster": "lowest"},
    "tr_two_lowest": {"tr_cluster": "two_lowest"},
    "tr_two_lowest_caps_0.3": {"tr_cluster": "two_lowest", "p_ri": 0.3, "p_kn": 0.3, "p_tr": 0.3},
}


def detection(cached) -> dict:
    from sklearn.metrics import roc_auc_score

    from mechsieve.tokens.base import REASON_BITS, TokenScores
    from mechsieve.tokens.xtf import Xtf, XtfConfig

    scores, truth = cached["scores"], cached["truth"]
    elig = np.concatenate(scores.eligible)
    injected = np.concatenate(truth)[elig]
    out = {"eligible_tokens": int(elig.sum()), "injected_tokens": int(injected.sum()),
           "injected_share": round(float(injected.mean()), 4), "settings": {}}
    # Threshold-free view: how well does each raw score rank injected tokens first?
    auc = {}
    for name, sign in (("ri", -1), ("kn", 1), ("tr", -1)):
        v = np.concatenate(scores.scores[name])[elig]
        ok = np.isfinite(v)
        auc[name] = round(float(roc_auc_score(injected[ok], sign * v[ok])), 4)
    out["roc_auc"] = auc
    out["roc_auc_note"] = "ri and tr: low score = noise; kn: high probability = noise"
    for label, overrides in SETTINGS.items():
        for subset in (["ri", "kn", "tr"], ["ri", "tr"]):
            cfg = XtfConfig(**overrides)
            sub = TokenScores({k: scores.scores[k] for k in subset}, scores.eligible, scores.info)
            masks = Xtf(cfg, words=["x"]).decide(sub)
            reasons = np.concatenate(masks.reasons)[elig]
            row = {a: pr((reasons & REASON_BITS[a]) > 0, injected) for a in subset}
            row["union"] = pr(reasons > 0, injected)
            row["tr_thresholds"] = masks.info.get("tr_thresholds")
            out["settings"][f"{label}/{'+'.join(subset)}"] = row
    return out


def phase_train(args, cached, runs: dict, save) -> None:
    """LoRA on the XTF-masked vs the unmasked items, per seed, a fresh base model each; held-out
    loss on clean GSM8K test answers. Runs already in `runs` (same variant and seed) are kept."""
    from mechsieve.tokens.xtf import Xtf, XtfConfig
    from mechsieve.train import TrainConfig, TrainItem

    rendered, scores = cached["rendered"], cached["scores"]
    masks = Xtf(XtfConfig()).decide(scores)  # paper defaults, all three attributes
    masked_labels = masks.labels(rendered)
    variants = {
        "unmasked": [TrainItem(r.input_ids, np.where(r.response_mask, r.input_ids, -100)) for r in rendered],
        "xtf_masked": [TrainItem(r.input_ids, lab) for r, lab in zip(rendered, masked_labels)],
    }
    test = heldout_gsm8k(args.test)
    evaluation = EvalSettings(max_len=args.max_len, max_tokens=2048)
    runs.setdefault("runs", [])
    runs.update({"steps": args.steps, "max_tokens": args.train_tokens, "learning_rate": args.lr,
                 "test_examples": len(test), "seeds": args.seeds})
    done = {(r["variant"], r["seed"]) for r in runs["runs"]}
    if "base_loss" not in runs:
        runs["base_loss"] = finetune_and_eval([], None, test, evaluation=evaluation, progress=False).heldout
        save()
    for seed in args.seeds:
        for variant, items in variants.items():
            if (variant, seed) in done:
                continue
            cfg = TrainConfig(max_steps=args.steps, learning_rate=args.lr, warmup_steps=3,
                              max_tokens=args.train_tokens, seed=seed)
            res = finetune_and_eval(items, cfg, test, evaluation=evaluation, progress=not args.quiet,
                                    label=f"{variant} seed {seed}")
            runs["runs"].append({"variant": variant, "seed": seed, **res.record()})
            save()
    by: dict[str, list[float]] = {}
    for r in runs["runs"]:
        by.setdefault(r["variant"], []).append(r["heldout"]["loss_per_token"])
    runs["loss_per_token"] = {k: spread(v) for k, v in by.items()}
    if {"unmasked", "xtf_masked"} <= by.keys():
        runs["masked_below_unmasked"] = runs["loss_per_token"]["xtf_masked"]["mean"] < \
            runs["loss_per_token"]["unmasked"]["mean"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=["score", "detect", "train", "all"], default="all")
    p.add_argument("--n", type=int, default=400, help="GSM8K train examples")
    p.add_argument("--rate", type=float, default=0.3, help="share of answers that get an injected span")
    p.add_argument("--seed", type=int, default=0, help="seed of the injection")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--test", type=int, default=100, help="clean GSM8K test answers for the held-out loss")
    p.add_argument("--steps", type=int, default=30, help="LoRA optimizer steps per run")
    p.add_argument("--train-tokens", type=int, default=1024, help="token budget of a training micro-batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    results = Results("token_noise", "B3 token noise (XTF)", model="smollm2-135m-instruct (float32, CPU)",
                      argv=argv)
    if args.phase in ("score", "all"):
        phase_score(args)
    with open(CACHE / "scores.pkl", "rb") as fh:
        cached = pickle.load(fh)
    sa = cached["args"]
    if args.phase == "score":  # new scores: fine-tunes on the old masks no longer belong to them
        results.drop("fine_tune")
    if args.phase in ("score", "all") or "scoring" not in results.data:
        results.phase("scoring").update({
            "data": {"train": f"GSM8K train first {sa['n']}", "injected_rate": sa["rate"],
                     "injection_seed": sa["seed"], "spans": "1-3 consecutive TinyStories sentences",
                     "injected_examples": sum(s is not None for s in cached["spans"]), "render": cached["render"]},
            "seconds": round(cached["seconds"], 1), "info": cached["scores"].info})
        results.save(finished="scoring")
    results.targets().update({"union_recall": ">= 0.5", "union_precision": ">= 0.5",
                              "fine_tune": "masked held-out loss below unmasked"})
    results.phase("detection").update(detection(cached))
    results.save(finished="detection")
    d = results["detection"]["settings"]["paper_defaults/ri+kn+tr"]["union"]
    print(f"token_noise: union precision {d['precision']} recall {d['recall']} (paper defaults); "
          f"AUC {results['detection']['roc_auc']}")
    if args.phase in ("train", "all"):
        runs = results.phase("fine_tune", merge=args.phase == "train")
        phase_train(args, cached, runs, results.save)
        results.save(finished="fine_tune")
        print(f"token_noise: held-out loss/token {runs.get('loss_per_token')} (base "
              f"{runs['base_loss']['loss_per_token']:.4f})")
    print(f"wrote {results.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
