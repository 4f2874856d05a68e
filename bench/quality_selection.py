"""B4 quality selection within a task: among GSM8K answers of which 40% are degraded, which
selectors keep the clean ones, and does training on their top 50% beat random 50% and all the data?

SmolLM2-135M-Instruct, real data from ../shared/data. Pool (`harness.pools.quality_pool`): `--n`
GSM8K train problems that none of B1, B1b or B3 use, seeded; `--share` of them degraded, in four
kinds in equal parts: one intermediate result and the final answer changed consistently; the answer
cut before its last line; the reasoning lines shuffled; the answer of another problem. Target: `--target`
other, clean GSM8K problems. Every example renders within `--max-len` tokens.

Phase `select`, every selector at 50%: NAIT, RDS+, loss (lowest) and IFD from one shared pool pass
(`select_many`), IGDS (its SAE trained on target + pool; when the default stops, e.g. its recall
against a reference drawn from this single-task pool leaves no latent, the benchmark records why and
runs it again with `reference=none`, then also `keep=top`), LESS, random (3 seeds). Per
method: the share of clean examples in the selection, per kind how many were selected, wall time.
Phase `train`: LoRA for one epoch on each selection and on the full pool (the IGDS paper's protocol:
50% gets half the steps of the full data), the random selections with their own seed, the others
with seed `--seed`; held-out loss per answer token on `--heldout` clean GSM8K test answers.

    flock /tmp/mechsieve-bench.lock python bench/quality_selection.py              # select + train
    flock /tmp/mechsieve-bench.lock python bench/quality_selection.py --phase train  # resumes

Results: bench/results/quality_selection.json (`pool`, `select`, `train`, `targets`, provenance).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from harness import ROOT, SEEDS, Results, beats_by, finetune_and_eval, heldout_gsm8k, spread
from harness.pools import DEGRADATIONS, quality_pool

FORWARD = ("nait", "rds", "loss", "ifd")
"""The forward-only selectors that share one pool pass."""


def record(out: dict, label: str, sel, kinds: np.ndarray, seconds: float, extra: dict | None = None) -> None:
    chosen = np.asarray(sel.selected, dtype=bool)
    by_kind = {k: int((chosen & (kinds == k)).sum()) for k in ("clean", *DEGRADATIONS)}
    out[label] = {"share_clean": round(by_kind["clean"] / max(int(chosen.sum()), 1), 4), "selected": int(chosen.sum()),
                  "by_kind": by_kind, "wall_s": round(seconds, 1), "selected_ids": list(sel.ids), **(extra or {})}
    print(f"  {label:<14} share_clean={out[label]['share_clean']:.3f}  {seconds:7.1f} s  {by_kind}", flush=True)


def run_select(args, loaded, pool, kinds, target, out: dict, save) -> None:
    from mechsieve.select import select_examples, select_many

    common = {"render": {"max_len": args.max_len}, "max_tokens": args.max_tokens, "max_batch": 64}
    done = set(out)
    wanted = args.methods.split(",")
    forward = [m for m in FORWARD if m in wanted and m not in done]
    if forward:
        print(f"[select] {', '.join(forward)}: one shared pool pass", flush=True)
        settings = {m: dict(common, **({"direction": "low"} if m == "loss" else {})) for m in forward}
        t0 = time.perf_counter()
        sels, report = select_many(settings, pool, args.budget, target=target, loaded=loaded, seed=args.seed,
                                   progress=not args.quiet)
        total = time.perf_counter() - t0
        for m in forward:
            record(out, m, sels[m], kinds, sels[m].timings.get("score_total", total),
                   {"timings": sels[m].timings, "explanations": sels[m].explanations,
                    "shared_pass_s": round(report.get("pass", {}).get("seconds", 0.0), 1)})
        out["_shared_pass"] = {"methods": forward, "wall_s": round(total, 1)}
        save()
    if "igds" in wanted and not any(k.startswith("igds") and "error" not in out[k] for k in done):
        # the SAE is trained once and reused by the later attempts (same settings)
        igds = {**common, "train": {"d_sae": args.sae_latents, "k": 16, "seed": args.seed},
                "save_sae": str(ROOT / "runs" / "bench_quality" / "igds_sae")}
        # the default first; when it stops (a within-task pool leaves no latent against a reference
        # drawn from the pool itself, or none beats its random controls), the benchmark records why
        # and tries the settings its message names, one step at a time
        for label, extra in (("igds", {}), ("igds_no_reference", {"reference": "none"}),
                             ("igds_no_reference_keep_top", {"reference": "none", "keep": "top"})):
            if label in out:  # stopped in an earlier run (recorded): the next settings
                print(f"[select] {label}: stopped before: {out[label]['error']}", flush=True)
                continue
            print(f"[select] {label}", flush=True)
            t0 = time.perf_counter()
            try:
                sel = select_examples("igds", pool, args.budget, target=target, loaded=loaded, seed=args.seed,
                                      settings={**igds, **extra}, progress=not args.quiet)
            except Exception as exc:  # noqa: BLE001 - the benchmark records why the method stopped
                out[label] = {"error": f"{type(exc).__name__}: {exc}", "wall_s": round(time.perf_counter() - t0, 1)}
                print(f"  {label}: stopped: {exc}", flush=True)
                save()
                continue
            record(out, label, sel, kinds, time.perf_counter() - t0,
                   {"timings": sel.timings, "explanations": sel.explanations})
            save()
            break  # the next settings only when these stopped
    if "less" in wanted and "less" not in done:
        from targeted_selection import less_settings

        print("[select] less", flush=True)
        t0 = time.perf_counter()
        sel = select_examples("less", pool, args.budget, target=target, loaded=loaded, seed=args.seed,
                              settings=less_settings(args), progress=not args.quiet)
        record(out, "less", sel, kinds, time.perf_counter() - t0, {"timings": sel.timings})
        save()
    if "random" in wanted:
        for seed in SEEDS:
            if f"random_seed{seed}" not in done:
                t0 = time.perf_counter()
                sel = select_examples("random", pool, args.budget, seed=seed)
                record(out, f"random_seed{seed}", sel, kinds, time.perf_counter() - t0)
        save()


def run_train(args, pool, out_select: dict, out: dict, save) -> None:
    from mechsieve.data import RenderConfig
    from mechsieve.train import TrainConfig

    heldout = heldout_gsm8k(args.heldout)
    by_id = {ex.id: ex for ex in pool.examples}
    render_cfg = RenderConfig(max_len=args.max_len)
    out.update(epochs=1, examples_per_step=args.train_batch, learning_rate=args.lr, heldout_examples=len(heldout))
    runs = out.setdefault("runs", {})
    if "base" not in runs:
        runs["base"] = finetune_and_eval([], None, heldout, progress=not args.quiet, label="base").record()
        save()
    subsets = {label: (v["selected_ids"], int(label.removeprefix("random_seed")) if label.startswith("random")
                       else args.seed) for label, v in out_select.items()
               if not label.startswith("_") and "selected_ids" in v}
    subsets["full"] = ([ex.id for ex in pool.examples], args.seed)
    for label, (ids, seed) in subsets.items():
        if label in runs:
            continue
        cfg = TrainConfig(epochs=1.0, max_batch=args.train_batch, max_tokens=args.train_batch * args.max_len,
                          learning_rate=args.lr, warmup_steps=2, seed=seed)
        res = finetune_and_eval([by_id[i] for i in ids], cfg, heldout, render_cfg, progress=not args.quiet,
                                label=label)
        runs[label] = res.record()
        save()


def summarize(sel: dict, train: dict, targets: dict) -> None:
    runs = train.get("runs", {})
    loss = {k: v["heldout_loss"] for k, v in runs.items()}
    rand = [loss[f"random_seed{s}"] for s in SEEDS if f"random_seed{s}" in loss]
    table = {}
    for label, v in sel.items():
        if label.startswith("_") or label.startswith("random"):
            continue
        table[label] = {"share_clean": v.get("share_clean"), "heldout_loss": loss.get(label),
                        "wall_s": v.get("wall_s"), **({"error": v["error"]} if "error" in v else {})}
    share = [sel[f"random_seed{s}"]["share_clean"] for s in SEEDS if f"random_seed{s}" in sel]
    if share:
        table["random"] = {"share_clean": spread(share, 4), "heldout_loss": spread(rand) if len(rand) > 1 else None}
    table["full"] = {"share_clean": None, "heldout_loss": loss.get("full")}
    train["table"] = table
    ours = {k: loss[k] for k in ("igds", "igds_no_reference", "igds_no_reference_keep_top", "nait") if k in loss}
    if not ours or len(rand) < len(SEEDS) or "full" not in loss:
        targets.update(best_method=None, best_beats_full=None, best_beats_random_2std=None, complete=False)
        return
    best = min(ours, key=ours.get)
    r = spread(rand)
    targets.update(best_method=best, best_loss=ours[best], best_beats_full=ours[best] < loss["full"],
                   best_beats_random_2std=beats_by(ours[best], r), random_loss=r, full_loss=loss["full"],
                   complete=True,
                   baselines={k: {"heldout_loss": loss[k], "best_beats_it": ours[best] < loss[k]}
                              for k in ("loss", "ifd", "rds", "less") if k in loss})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=["select", "train", "all", "summarize"], default="all")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--share", type=float, default=0.4, help="degraded share of the pool")
    p.add_argument("--target", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--methods", default="nait,rds,loss,ifd,igds,less,random")
    p.add_argument("--sae-latents", type=int, default=1024, help="IGDS: latents of the TopK SAE trained here")
    p.add_argument("--train-batch", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    # LESS (as in B1; targeted_selection.less_settings reads these)
    p.add_argument("--less-epochs", type=int, default=2)
    p.add_argument("--less-proj-dim", type=int, default=8192)
    p.add_argument("--less-rank", type=int, default=16)
    p.add_argument("--less-modules", default="all-linear")
    p.add_argument("--less-project-mb", type=float, default=4096.0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from mechsieve.data import Pool
    from mechsieve.models import load_model
    from mechsieve.models.loading import load_tokenizer

    results = Results("quality_selection", "B4 quality selection within a task",
                      model="smollm2-135m-instruct (float32, CPU)", argv=argv)
    tok = load_tokenizer("smollm2-135m-instruct")
    examples, kinds, target_examples = quality_pool(tok, args.n, args.share, args.target, args.max_len, args.seed)
    pool = Pool(examples, "b4", "memory", "question_answer")
    target = Pool(target_examples, "b4-target", "memory", "question_answer")
    results.set("pool", dict(n=len(examples), degraded_share=args.share, kinds={k: int((kinds == k).sum()) for k in
                                                                    ("clean", *DEGRADATIONS)},
                target=len(target_examples), max_len=args.max_len, seed=args.seed,
                source="GSM8K train, none of B1/B1b/B3's rows", budget=args.budget))
    results.save()
    if args.phase in ("select", "all"):
        out = results.phase("select", merge=True)
        if "_stopped" in out:  # a run stopped by hand, which this one resumes: its note is kept
            out["_stopped_before"] = out.pop("_stopped")
        run_select(args, load_model("smollm2-135m-instruct"), pool, kinds, target, out, results.save)
        results.save(finished="select")
    if args.phase in ("train", "all"):
        out = results.phase("train", merge=True)
        run_train(args, pool, results["select"], out, results.save)
        results.save(finished="train")
    summarize(results["select"], results.get("train") or {}, results.targets())
    results.save()
    print(f"quality_selection: {results.targets()}")
    print(f"wrote {results.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
