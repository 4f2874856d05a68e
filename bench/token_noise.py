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
import json
import pickle
import platform
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from _common import command_line

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "results" / "token_noise.json"
CACHE = ROOT / "runs" / "bench_token_noise"


def story_sentences(path: Path) -> list[list[str]]:
    """TinyStories split into stories, each a list of sentences."""
    text = path.read_text(encoding="utf-8", errors="replace")
    stories = []
    for story in text.split("<|endoftext|>"):
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(story.split())) if s.strip()]
        sents = [s for s in sents if 4 <= len(s.split()) <= 30 and '"' not in s]
        if len(sents) >= 3:
            stories.append(sents)
    return stories


def inject(examples, rate: float, seed: int):
    """Insert story spans into a seeded `rate` share of the answers; returns the new examples and,
    per example, the injected text or None."""
    rng = np.random.default_rng(seed)
    stories = story_sentences(DATA / "stories" / "tinystories_train_sample_2MiB.txt")
    chosen = set(rng.choice(len(examples), size=int(round(rate * len(examples))), replace=False).tolist())
    out, spans = [], []
    for i, ex in enumerate(examples):
        if i not in chosen:
            out.append(ex)
            spans.append(None)
            continue
        story = stories[int(rng.integers(len(stories)))]
        k = int(rng.integers(1, 4))
        start = int(rng.integers(0, max(1, len(story) - k)))
        span = " ".join(story[start:start + k])
        lines = ex.response.split("\n")
        at = int(rng.integers(0, max(1, len(lines) - 1)))  # never after the '#### N' line
        lines[at] = lines[at] + " " + span
        out.append(replace(ex, response="\n".join(lines), meta={**ex.meta, "injected": span}))
        spans.append(span)
    return out, spans


def injected_tokens(tokenizer, example, rendered, span: str | None) -> np.ndarray:
    """bool [t]: tokens of the rendered example whose characters lie mostly inside the span."""
    flags = np.zeros(len(rendered), dtype=bool)
    if span is None:
        return flags
    messages = [*example.prompt, {"role": "assistant", "content": example.response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"])[: len(rendered)] != rendered.input_ids.tolist():
        raise RuntimeError(f"{example.id}: offsets tokenization differs from the rendered ids")
    s = text.rfind(span)
    e = s + len(span)
    for pos, (a, b) in enumerate(enc["offset_mapping"][: len(rendered)]):
        if b > a and s <= (a + b) / 2 < e:
            flags[pos] = True
    return flags & rendered.response_mask


def pr(masked: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((masked & truth).sum())
    return {"masked": int(masked.sum()), "hits": tp,
            "precision": round(tp / masked.sum(), 4) if masked.sum() else None,
            "recall": round(tp / truth.sum(), 4) if truth.sum() else None}


def phase_score(args) -> None:
    from mechsieve.data import RenderConfig, read_pool, render_pool
    from mechsieve.models import load_model
    from mechsieve.tokens.xtf import Xtf, XtfConfig

    loaded = load_model("smollm2-135m-instruct")
    pool = read_pool(DATA / "gsm8k" / "train.jsonl", limit=args.n)
    examples, spans = inject(pool.examples, args.rate, args.seed)
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


def phase_train(args, cached, result) -> None:
    import torch

    from mechsieve.data import RenderConfig, read_pool
    from mechsieve.evaluate import heldout_loss
    from mechsieve.models import load_model
    from mechsieve.tokens.xtf import Xtf, XtfConfig
    from mechsieve.train import TrainConfig, TrainItem, train

    rendered, scores = cached["rendered"], cached["scores"]
    masks = Xtf(XtfConfig()).decide(scores)  # paper defaults, all three attributes
    masked_labels = masks.labels(rendered)
    variants = {
        "unmasked": [TrainItem(r.input_ids, np.where(r.response_mask, r.input_ids, -100)) for r in rendered],
        "xtf_masked": [TrainItem(r.input_ids, lab) for r, lab in zip(rendered, masked_labels)],
    }
    test = read_pool(DATA / "gsm8k" / "test.jsonl", limit=args.test).examples
    render = RenderConfig(max_len=args.max_len)
    runs = result.setdefault("fine_tune", {"runs": []})
    runs.update({"steps": args.steps, "max_tokens": args.train_tokens, "learning_rate": args.lr,
                 "test_examples": len(test), "seeds": args.seeds})
    done = {(r["variant"], r["seed"]) for r in runs["runs"]}
    if "base_loss" not in runs:
        loaded = load_model("smollm2-135m-instruct")
        runs["base_loss"] = heldout_loss(loaded.model, loaded.tokenizer, test, render, 2048, progress=False)
        save(result)
    for seed in args.seeds:
        for variant, items in variants.items():
            if (variant, seed) in done:
                continue
            loaded = load_model("smollm2-135m-instruct")  # fresh base model for every run
            torch.manual_seed(seed)
            cfg = TrainConfig(max_steps=args.steps, learning_rate=args.lr, warmup_steps=3,
                              max_tokens=args.train_tokens, seed=seed)
            tr = train(loaded, items, cfg, out_dir=None, progress=not args.quiet)
            loss = heldout_loss(loaded.model, loaded.tokenizer, test, render, 2048, progress=False)
            runs["runs"].append({"variant": variant, "seed": seed, "heldout": loss,
                                 "train_label_tokens": tr.tokens, "train_seconds": round(tr.seconds, 1),
                                 "final_train_loss": round(tr.loss_curve[-1], 4)})
            save(result)
            print(f"{variant} seed {seed}: held-out loss/token {loss['loss_per_token']:.4f} "
                  f"({tr.seconds:.0f} s training)")
    by = {}
    for r in runs["runs"]:
        by.setdefault(r["variant"], []).append(r["heldout"]["loss_per_token"])
    runs["mean_loss_per_token"] = {k: round(float(np.mean(v)), 5) for k, v in by.items()}
    if {"unmasked", "xtf_masked"} <= by.keys():
        runs["masked_below_unmasked"] = runs["mean_loss_per_token"]["xtf_masked"] < runs["mean_loss_per_token"]["unmasked"]


def save(result: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")


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
    command = command_line(__file__, argv)
    if args.phase in ("score", "all"):
        phase_score(args)
    with open(CACHE / "scores.pkl", "rb") as fh:
        cached = pickle.load(fh)
    result = json.loads(OUT.read_text()) if OUT.exists() and args.phase == "train" else {}
    result.setdefault("commands", []).append(command)
    sa = cached["args"]
    result.update({"benchmark": "B3 token noise (XTF)", "model": "smollm2-135m-instruct (float32, CPU)",
                   "machine": f"{platform.machine()} {platform.system()}, shared 2-core CPU",
                   "data": {"train": f"GSM8K train first {sa['n']}", "injected_rate": sa["rate"],
                            "injection_seed": sa["seed"], "spans": "1-3 consecutive TinyStories sentences",
                            "injected_examples": sum(s is not None for s in cached["spans"]),
                            "render": cached["render"]},
                   "scoring_seconds": round(cached["seconds"], 1), "scoring_info": cached["scores"].info,
                   "targets": {"union_recall": ">= 0.5", "union_precision": ">= 0.5",
                               "fine_tune": "masked held-out loss below unmasked"}})
    result["detection"] = detection(cached)
    save(result)
    d = result["detection"]["settings"]["paper_defaults/ri+kn+tr"]["union"]
    print(f"token_noise: union precision {d['precision']} recall {d['recall']} (paper defaults); "
          f"AUC {result['detection']['roc_auc']}")
    if args.phase in ("train", "all"):
        phase_train(args, cached, result)
        save(result)
        ft = result["fine_tune"]
        print(f"token_noise: held-out loss/token {ft.get('mean_loss_per_token')} (base "
              f"{ft['base_loss']['loss_per_token']:.4f})")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
