"""B3 token noise, made fair: do the token maskers find injected irrelevant spans, and does masking
them help fine-tuning against a random mask of the same size?

Data: GSM8K train answers (the first --n), a seeded --rate of them with 1-3 consecutive
TinyStories sentences inserted at the end of a random reasoning line (the injected tokens are
recorded from the tokenizer's character offsets), and a clean copy of the same answers. The
clean in-domain set the robust maskers read: --n-ref GSM8K train problems after the pool's.

Phase `score` (SmolLM2-135M-Instruct, float32, CPU): every masker scores every response token of
both copies:
- XTF `paper` (RI, KN, TR as the paper builds them) and XTF `robust` (relative RI over the middle
  layers, contextual TR against the in-domain set, numbers protected, span smoothing, the pool
  MAD rule), tokens/xtf.py;
- excess loss (Rho-1 / TokenCleaning): a LoRA reference fitted on the in-domain set,
  loss_base - loss_ref per token, keep the top 60% (tokens/excess_loss.py) and, as a second rule,
  mask below 0 (the reference finds the token less likely than the base).
Phase `detect`: ROC AUC of every raw score for the injected tokens; precision / recall of each
masker's mask; on the clean copy, the share of masked tokens that are digits or operators against
their share of all response tokens.
Phase `train`: LoRA (--steps, 3 seeds, a fresh base model per run) on the unmasked items, each
masker's (the excess-loss rule below 0 only when it is the best, or with --all-maskers), and a
random mask at the rate of the best masker (by F1 against the injected tokens), seeded per run;
held-out loss per token on --test clean GSM8K test answers; mean and sample std.

    flock /tmp/mechsieve-bench.lock python bench/token_noise.py            # all phases
    flock /tmp/mechsieve-bench.lock python bench/token_noise.py --phase train    # resumes the fine-tunes
    flock /tmp/mechsieve-bench.lock python bench/token_noise.py --phase rescore  # the scores pickle again
    python bench/token_noise.py --phase summarize    # spreads and targets of the runs so far

Results: bench/results/token_noise.json (`scoring`, `detection`, `fine_tune`, `targets`).
"""

from __future__ import annotations

import argparse
import pickle
import re
import time

import numpy as np

from harness import (
    ROOT,
    SEEDS,
    EvalSettings,
    Results,
    beats_by,
    finetune_and_eval,
    heldout_gsm8k,
    read_source,
    spread,
)
from harness.pools import inject_spans, injected_tokens

CACHE = ROOT / "runs" / "bench_token_noise"
MASKERS = ("xtf_paper", "xtf_robust", "excess_loss", "excess_loss_below_0")
ARITH = re.compile(r"^\s*[\d.,+\-*/=%$()<>]+\s*$")


def pr(masked: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((masked & truth).sum())
    p = tp / masked.sum() if masked.sum() else 0.0
    r = tp / truth.sum() if truth.sum() else 0.0
    return {"masked": int(masked.sum()), "hits": tp, "precision": round(float(p), 4), "recall": round(float(r), 4),
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0}


def build(args):
    from mechsieve.data import RenderConfig

    rows = read_source("gsm8k", limit=args.n + args.n_ref)
    clean, ref = rows[:args.n], rows[args.n:args.n + args.n_ref]
    injected, spans = inject_spans(clean, args.rate, args.seed)
    return clean, injected, spans, ref, RenderConfig(max_len=args.max_len)


def phase_score(args) -> dict:
    from mechsieve.data import render_pool
    from mechsieve.models import load_model
    from mechsieve.tokens.excess_loss import ExcessLoss, ExcessLossConfig
    from mechsieve.tokens.xtf import Xtf, XtfConfig

    loaded = load_model("smollm2-135m-instruct")
    clean, injected, spans, ref, render_cfg = build(args)
    rendered, stats = render_pool(injected, loaded.tokenizer, render_cfg)
    rendered_clean, _ = render_pool(clean, loaded.tokenizer, render_cfg)
    truth = [injected_tokens(loaded.tokenizer, ex, r, s) for ex, r, s in zip(injected, rendered, spans)]
    out = {"rendered": rendered, "rendered_clean": rendered_clean, "truth": truth, "render": stats.summary(),
           "spans": spans, "args": vars(args), "scores": {}, "seconds": {}}
    maskers = {"xtf_paper": Xtf(XtfConfig(preset="paper")),
               "xtf_robust": Xtf(XtfConfig(), target=ref, render_cfg=render_cfg)}
    t0 = time.perf_counter()
    excess = ExcessLoss(ExcessLossConfig())
    excess.fit_reference(loaded, ref, render_cfg, progress=not args.quiet)
    out["seconds"]["excess_loss_reference_fit"] = round(time.perf_counter() - t0, 1)
    maskers["excess_loss"] = excess
    for name, masker in maskers.items():
        for copy, rs in (("injected", rendered), ("clean", rendered_clean)):
            t0 = time.perf_counter()
            out["scores"][(name, copy)] = masker.score(loaded.model, loaded.tokenizer, rs, progress=not args.quiet)
            out["seconds"][f"{name}/{copy}"] = round(time.perf_counter() - t0, 1)
            print(f"[score] {name} on the {copy} copy: {out['seconds'][f'{name}/{copy}']:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "scores.pkl", "wb") as fh:
        pickle.dump(out, fh)
    return out


def deciders():
    from mechsieve.tokens.excess_loss import ExcessLoss, ExcessLossConfig
    from mechsieve.tokens.xtf import Xtf, XtfConfig

    return {"xtf_paper": ("xtf_paper", Xtf(XtfConfig(preset="paper"), words=["x"])),
            "xtf_robust": ("xtf_robust", Xtf(XtfConfig(tr_embedding="context_free"), words=["x"])),
            # the robust preset's first rule (the outlier cut alone), measured before rule=mixture
            "xtf_robust_mad": ("xtf_robust", Xtf(XtfConfig(tr_embedding="context_free", rule="mad"), words=["x"])),
            "excess_loss": ("excess_loss", ExcessLoss(ExcessLossConfig())),
            "excess_loss_below_0": ("excess_loss", ExcessLoss(ExcessLossConfig(rule="threshold", threshold=0.0)))}


def masks_of(cached) -> dict:
    """masker -> (masks on the injected copy, masks on the clean copy)."""
    return {name: tuple(dec.decide(cached["scores"][(src, copy)]) for copy in ("injected", "clean"))
            for name, (src, dec) in deciders().items()}


def detection(cached, tokenizer) -> dict:
    from sklearn.metrics import roc_auc_score

    scores = cached["scores"]
    elig = np.concatenate(scores[("xtf_paper", "injected")].eligible)
    injected = np.concatenate(cached["truth"])[elig]
    out = {"eligible_tokens": int(elig.sum()), "injected_tokens": int(injected.sum()),
           "injected_share": round(float(injected.mean()), 4), "roc_auc": {}, "maskers": {}}
    # threshold-free: how well each raw score ranks the injected tokens first
    for src, name, sign in (("xtf_paper", "ri", -1), ("xtf_paper", "kn", 1), ("xtf_paper", "tr", -1),
                            ("xtf_robust", "ri", -1), ("xtf_robust", "tr", -1), ("excess_loss", "el", -1)):
        v = np.concatenate(scores[(src, "injected")].scores[name])[elig]
        ok = np.isfinite(v)
        out["roc_auc"][f"{src.removeprefix('xtf_')}_{name}"] = {
            "auc": round(float(roc_auc_score(injected[ok], sign * v[ok])), 4), "scored_share": round(float(ok.mean()), 4)}
    out["roc_auc_note"] = ("low score = noise, but paper_kn (high probability = noise); tokens a score leaves "
                           "unscored (NaN: numbers under robust TR) are left out of its AUC")
    clean_elig = scores[("xtf_paper", "clean")].eligible
    pieces = {}
    arith_all = []
    for r, e in zip(cached["rendered_clean"], clean_elig):
        for t in r.input_ids[e]:
            t = int(t)
            if t not in pieces:
                pieces[t] = bool(ARITH.match(tokenizer.decode([t])))
            arith_all.append(pieces[t])
    arith_all = np.asarray(arith_all)
    out["clean_digit_operator_share"] = round(float(arith_all.mean()), 4)
    for name, (on_injected, on_clean) in masks_of(cached).items():
        reasons = np.concatenate(on_injected.reasons)[elig]
        row = {"union": pr(reasons > 0, injected), "decision": on_injected.info}
        for attr, bit in (("ri", 1), ("kn", 2), ("tr", 4)):
            if (reasons & bit).any() or name.startswith("xtf"):
                row[attr] = pr((reasons & bit) > 0, injected)
        clean_masked = np.concatenate([m[e] for m, e in zip(on_clean.masks, clean_elig)])
        share = float(arith_all[clean_masked].mean()) if clean_masked.any() else 0.0
        row["clean_copy"] = {"masked_share": round(float(clean_masked.mean()), 4),
                             "digit_operator_share_of_masked": round(share, 4),
                             "over_masks_digits": share > 1.5 * float(arith_all.mean())}
        out["maskers"][name] = row
    best = max(out["maskers"], key=lambda k: out["maskers"][k]["union"]["f1"])
    out["best_masker"] = best
    return out


def phase_train(args, cached, best: str, runs: dict, save) -> None:
    from mechsieve.train import TrainConfig, TrainItem

    rendered = cached["rendered"]
    masks = {name: on_injected for name, (on_injected, _) in masks_of(cached).items()}
    elig = cached["scores"][("xtf_paper", "injected")].eligible
    rate = float(np.concatenate(masks[best].masks)[np.concatenate(elig)].mean())
    unmasked = [TrainItem(r.input_ids, np.where(r.response_mask, r.input_ids, -100)) for r in rendered]
    test = heldout_gsm8k(args.test)
    evaluation = EvalSettings(max_len=args.max_len, max_tokens=2048)
    runs.setdefault("runs", [])
    runs.update({"steps": args.steps, "max_tokens": args.train_tokens, "learning_rate": args.lr,
                 "test_examples": len(test), "seeds": list(SEEDS), "best_masker": best,
                 "random_mask_rate": round(rate, 4)})
    for r in runs["runs"]:  # runs from before digests: stamped once, by hand, after a rescore reproduced them
        if "mask_digest" not in r and r["variant"] in args.adopt_old_runs.split(","):
            r["mask_digest"] = "adopt"
    if "base_loss" not in runs:
        runs["base_loss"] = finetune_and_eval([], None, test, evaluation=evaluation, progress=False).heldout
        save()
    for seed in SEEDS:
        rng = np.random.default_rng(1000 + seed)
        random_masks = [e & (rng.random(len(e)) < rate) for e in elig]
        variants = {"unmasked": unmasked,
                    **{name: [TrainItem(r.input_ids, lab) for r, lab in zip(rendered, m.labels(rendered))]
                       for name, m in masks.items()},
                    "random_mask": [TrainItem(r.input_ids, np.where(r.response_mask & ~m, r.input_ids, -100))
                                    for r, m in zip(rendered, random_masks)]}
        for variant, items in variants.items():
            trained = {"unmasked", "random_mask", "xtf_paper", "xtf_robust", "excess_loss", best}
            if variant not in trained and not args.all_maskers:
                continue
            digest = labels_digest(items)
            old = [r for r in runs["runs"] if (r["variant"], r["seed"]) == (variant, seed)]
            for r in old:
                if r.get("mask_digest") == "adopt":
                    r["mask_digest"] = digest
            if any(r.get("mask_digest") == digest for r in old):
                continue
            if old:  # trained on another mask (a changed rule, or another best masker's rate)
                print(f"[train] {variant} seed {seed}: the mask changed; its old run is dropped", flush=True)
                runs["runs"] = [r for r in runs["runs"] if r not in old]
            cfg = TrainConfig(max_steps=args.steps, learning_rate=args.lr, warmup_steps=3,
                              max_tokens=args.train_tokens, seed=seed)
            res = finetune_and_eval(items, cfg, test, evaluation=evaluation, progress=not args.quiet,
                                    label=f"{variant} seed {seed}")
            runs["runs"].append({"variant": variant, "seed": seed, "mask_digest": digest, **res.record()})
            print(f"[train] {variant} seed {seed}: {res.record()['heldout']['loss_per_token']:.4f}", flush=True)
            save()
    summarize_runs(runs)


def labels_digest(items: list) -> str:
    """What a fine-tune was trained on: a hash of every item's labels (a rerun skips a run only when
    its mask is the same)."""
    import hashlib

    h = hashlib.sha1()
    for it in items:
        h.update(np.asarray(it.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def summarize_runs(runs: dict) -> None:
    """Mean and sample std of the held-out loss per variant, from the runs made so far."""
    by: dict[str, list[float]] = {}
    for r in runs["runs"]:
        by.setdefault(r["variant"], []).append(r["heldout"]["loss_per_token"])
    runs["loss_per_token"] = {k: spread(v) for k, v in by.items()}
    # complete when every variant still trained has all seeds (kept runs of stale variants, e.g.
    # xtf_robust_mad, do not count)
    trained = {"unmasked", "random_mask", "xtf_paper", "xtf_robust", "excess_loss", runs.get("best_masker")}
    runs["complete"] = trained <= by.keys() and all(len(by[k]) == len(SEEDS) for k in trained)


def fine_tune_targets(t: dict, runs: dict, best: str) -> None:
    lpt = runs.get("loss_per_token", {})
    full = {best, "unmasked", "random_mask"} <= lpt.keys() and all(lpt[k]["n"] == len(SEEDS) for k in
                                                                   (best, "unmasked", "random_mask"))
    t.update({"best_beats_unmasked_2std": beats_by(lpt[best]["mean"], lpt["unmasked"]) if full else None,
              "best_beats_random_mask_2std": beats_by(lpt[best]["mean"], lpt["random_mask"]) if full else None,
              "fine_tune_complete": bool(runs.get("complete")),
              })
    for name in (best, "unmasked", "random_mask"):
        if name in lpt:
            t[f"loss_{name}"] = lpt[name]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=["score", "rescore", "detect", "train", "summarize", "all"], default="all",
                   help="rescore: recompute the scores pickle only (it is not committed), leaving the JSON alone")
    p.add_argument("--n", type=int, default=400, help="GSM8K train examples")
    p.add_argument("--n-ref", type=int, default=64, help="clean in-domain GSM8K problems after the pool's")
    p.add_argument("--rate", type=float, default=0.3, help="share of answers that get an injected span")
    p.add_argument("--seed", type=int, default=0, help="seed of the injection")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--test", type=int, default=100, help="clean GSM8K test answers for the held-out loss")
    p.add_argument("--steps", type=int, default=30, help="LoRA optimizer steps per run")
    p.add_argument("--train-tokens", type=int, default=1024, help="token budget of a training micro-batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--all-maskers", action="store_true",
                   help="also fine-tune on the second excess-loss rule's mask (below 0) when it is not the best")
    p.add_argument("--adopt-old-runs", default="", metavar="VARIANTS",
                   help="comma-separated variants whose fine-tunes saved without a mask digest are taken as trained "
                        "on today's masks (only after a rescore reproduced the detection figures and the random "
                        "mask rate they were trained with)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from mechsieve.models.loading import load_tokenizer

    results = Results("token_noise", "B3 token noise (fair)", model="smollm2-135m-instruct (float32, CPU)",
                      argv=argv)
    if args.phase == "rescore":  # a fresh checkout has no pickle; the scores are deterministic
        cached = phase_score(args)
        print(f"wrote {CACHE / 'scores.pkl'}")
        return 0
    if args.phase in ("score", "all"):
        results.drop("fine_tune")  # new scores: fine-tunes on the old masks no longer belong to them
        out = results.phase("scoring")
        cached = phase_score(args)
        sa = cached["args"]
        out.update({"data": {"train": f"GSM8K train first {sa['n']}", "in_domain": f"GSM8K train {sa['n']}.."
                             f"{sa['n'] + sa['n_ref'] - 1}", "injected_rate": sa["rate"], "injection_seed": sa["seed"],
                             "spans": "1-3 consecutive TinyStories sentences",
                             "injected_examples": sum(s is not None for s in cached["spans"]),
                             "render": cached["render"]},
                    "seconds": cached["seconds"],
                    "info": {f"{k[0]}/{k[1]}": v.info for k, v in cached["scores"].items()}})
        results.save(finished="scoring")
    elif args.phase != "summarize":
        with open(CACHE / "scores.pkl", "rb") as fh:
            cached = pickle.load(fh)
    if args.phase == "summarize":
        det = results["detection"]
    else:
        tokenizer = load_tokenizer("smollm2-135m-instruct")
        det = results.phase("detection")
        det.update(detection(cached, tokenizer))
        results.save(finished="detection")
    best = det["best_masker"]
    b = det["maskers"][best]["union"]
    t = results.targets()
    for stale in ("union_recall", "union_precision", "fine_tune"):  # the old B3's target texts
        t.pop(stale, None)
    t.update({"best_masker": best, "best_precision": b["precision"], "best_recall": b["recall"],
              "best_precision_and_recall_at_least_0_5": b["precision"] >= 0.5 and b["recall"] >= 0.5,
              "robust_ri_auc": det["roc_auc"]["robust_ri"]["auc"], "robust_tr_auc": det["roc_auc"]["robust_tr"]["auc"],
              "robust_ri_and_tr_auc_at_least_0_75": min(det["roc_auc"]["robust_ri"]["auc"],
                                                        det["roc_auc"]["robust_tr"]["auc"]) >= 0.75,
              "best_over_masks_digits_on_clean": det["maskers"][best]["clean_copy"]["over_masks_digits"]})
    results.save()
    print(f"token_noise: best masker {best}: precision {b['precision']} recall {b['recall']}; AUC "
          f"{ {k: v['auc'] for k, v in det['roc_auc'].items()} }", flush=True)
    if args.phase in ("train", "all"):
        runs = results.phase("fine_tune", merge=args.phase == "train")
        phase_train(args, cached, best, runs, results.save)
        fine_tune_targets(t, runs, best)
        results.save(finished="fine_tune")
        print(f"token_noise: held-out loss/token {runs['loss_per_token']}", flush=True)
    if args.phase == "summarize":  # the spreads and targets of the fine-tunes made so far (no model)
        summarize_runs(results["fine_tune"])
        fine_tune_targets(t, results["fine_tune"], best)
        results.save()
    print(f"wrote {results.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
