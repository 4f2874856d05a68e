"""B1 targeted selection: which methods find the GSM8K examples in a mixed pool, and does
fine-tuning on the NAIT selection beat random 10% at equal steps?

SmolLM2-135M-Instruct, real data from ../shared/data. Pool: `--per-source` examples (seeded
sample) from each of GSM8K train, MBPP, MedQA, Alpaca (Cherry), LIMA, insecure code and
TinyStories, rendered to at most `--max-len` tokens (longer ones cut; counted). Target:
`--target` other GSM8K train examples. Budget 10%.

Phase `select`: every method scores the pool; per method the share of the selection that comes
from GSM8K (random: about 1/7) and the wall time. Scores go to
bench/results/targeted_selection_scores.parquet and the selected ids into the JSON, so phase
`train` need not recompute them.
Phase `train`: LoRA on the NAIT selection, on random 10% (3 seeds) and on the full pool, all with
the same number of optimizer steps, each from a freshly loaded base model; held-out loss per
answer token on `--heldout` GSM8K test answers (the base model's too).

LESS (`--methods less`, not in the default list: its warm-up and dense projections are the
costliest step): warm-up LoRA (`--less-modules`, `--less-rank`) on a seeded 5% of the pool for
`--less-epochs` epochs, Adam-preconditioned LoRA gradients projected to `--less-proj-dim`, the
target's plain gradients, cosine weighted by each epoch's mean learning rate (METHODS.md 5).
A `--methods` or `--runs` list other than the default merges into the saved results (other
methods' entries, score columns and runs are kept; `--no-merge` replaces them):

    flock /tmp/mechsieve-bench.lock python bench/targeted_selection.py --phase select
    flock /tmp/mechsieve-bench.lock python bench/targeted_selection.py --phase train
    flock /tmp/mechsieve-bench.lock python bench/targeted_selection.py --methods less   # select + train

Results: bench/results/targeted_selection.json under the fixed keys `pool`, `select`, `train`,
`nait_variants`, `targets`, and `provenance` (per phase: command, commit, machine, wall time).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from harness import B1_SOURCES, RESULTS, SEEDS, Results, finetune_and_eval, heldout_gsm8k, spread
from harness.pools import mixed_pool
from mechsieve.store.atomic import atomic_path

SCORES = RESULTS / "targeted_selection_scores.parquet"
DEFAULT_METHODS = "random,nait,nait_paper,rds,kcenter,loss_high,loss_low,ifd"
DEFAULT_RUNS = "nait,nait_paper,random,full"
RUN_LABELS = ("nait", "nait_paper", "less")  # selections whose fine-tune is compared with random's


def run_select(args, loaded, pool, target, out: dict, save, merge: bool) -> dict:
    """Every method in turn (NAIT first, IFD, the costliest, last) into `out`, `save()` after each.
    With `merge`, the other methods already in `out` and the saved score columns are kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mechsieve.data import RenderConfig, render_pool
    from mechsieve.scorers.baselines import RdsConfig, RdsScorer
    from mechsieve.scorers.kcenter import KCenterConfig, KCenterScorer
    from mechsieve.select import choose, select_examples

    render = {"max_len": args.max_len}
    batch = {"max_tokens": args.max_tokens, "max_batch": 64}
    _, rstats = render_pool(pool.examples, loaded.tokenizer, RenderConfig(max_len=args.max_len))
    ids = [ex.id for ex in pool.examples]
    sources = np.array([ex.source for ex in pool.examples])
    out.update(render=rstats.summary(), truncated=rstats.truncated)
    methods: dict[str, dict] = out.setdefault("methods", {})
    columns: dict[str, np.ndarray] = saved_columns(ids) if merge else {}

    def record(label: str, scores, selected, order, seconds, extra=None):
        chosen = [ids[i] for i in order if selected[i]]
        by_source = {s: int((selected & (sources == s)).sum()) for s in B1_SOURCES}
        methods[label] = {"share_gsm8k": round(by_source["gsm8k"] / max(int(selected.sum()), 1), 4),
                          "selected": int(selected.sum()), "by_source": by_source,
                          "wall_s": round(seconds, 2), "selected_ids": chosen, **(extra or {})}
        columns[label] = np.asarray(scores, dtype=np.float64)
        print(f"  {label:<10} share_gsm8k={methods[label]['share_gsm8k']:.3f}  {seconds:7.1f} s  {by_source}",
              flush=True)
        table = pa.table({"id": ids, "source": list(sources), **{k: pa.array(v) for k, v in columns.items()}})
        with atomic_path(SCORES) as tmp:
            pq.write_table(table, tmp)
        save()

    def through_pipeline(label: str, method: str, extra: dict | None = None) -> None:
        print(f"[select] {label}", flush=True)
        t0 = time.perf_counter()
        sel = select_examples(method, pool, args.budget, target=target, loaded=loaded, seed=0,
                              settings=None if method == "random" else {"render": render, **batch, **(extra or {})},
                              progress=not args.quiet)
        seconds = time.perf_counter() - t0
        record(label, sel.scores, sel.selected, np.argsort(sel.ranks), seconds,
               {"timings": sel.timings, "explanations": sel.explanations})
        if method == "loss":  # the low end of the same scores: no second pass
            low = choose(sel.scores, ids, args.budget, "bottom")
            record("loss_low", sel.scores, low.selected, low.order, seconds, {"note": "same pass as loss_high"})

    wanted = args.methods.split(",")
    # nait: the robust default (anchor on the last user turn, cosine, target z-scores, layers by
    # held-out AUC); nait_paper: the paper-literal recipe B1 measured first
    for label, method, extra in (("random", "random", None), ("nait", "nait", None),
                                 ("nait_paper", "nait", {"preset": "paper"})):
        if label in wanted:
            through_pipeline(label, method, extra)
    if "rds" in wanted or "kcenter" in wanted:
        # RDS+ runs its scorer directly (as select_examples does) to keep its pool embeddings, on
        # which k-center then runs: k-center's wall time = that embedding pass + its traversal.
        print("[select] rds", flush=True)
        t0 = time.perf_counter()
        rds = RdsScorer(RdsConfig(render=RenderConfig(**render), **batch))
        res = rds.score(pool, target=target, loaded=loaded, progress=not args.quiet)
        picked = choose(res.scores, ids, args.budget, "top")
        record("rds", res.scores, picked.selected, picked.order, time.perf_counter() - t0, {"timings": res.timings})
        print("[select] kcenter (cosine, on the RDS+ pool embeddings)", flush=True)
        t0 = time.perf_counter()
        res = KCenterScorer(KCenterConfig(), features=rds.pool_embeddings).score(pool)
        picked = choose(res.scores, ids, args.budget, "top")
        record("kcenter", res.scores, picked.selected, picked.order,
               time.perf_counter() - t0 + float(res_timing(methods)),
               {"explanations": res.explanations, "note": "wall_s includes the RDS+ pool pass"})
    if {"loss_high", "loss_low", "ifd"} & set(wanted):
        through_pipeline("loss_high", "loss")
    if "less" in wanted:
        print("[select] less", flush=True)
        t0 = time.perf_counter()
        sel = select_examples("less", pool, args.budget, target=target, loaded=loaded, seed=0,
                              settings=less_settings(args), progress=not args.quiet)
        record("less", sel.scores, sel.selected, np.argsort(sel.ranks), time.perf_counter() - t0,
               {"timings": sel.timings, "explanations": sel.explanations, "settings": less_settings(args)})
    if "ifd" in wanted:
        # IFD's conditional term is exactly the loss scorer's score (same render and mask; a unit
        # test checks it), so only the response-alone pass runs here; wall_s adds the loss pass.
        from mechsieve.scorers.baselines import IfdConfig, IfdScorer

        print("[select] ifd (conditional term from the loss pass)", flush=True)
        t0 = time.perf_counter()
        res = IfdScorer(IfdConfig(render=RenderConfig(**render), **batch),
                        conditional_loss=columns["loss_high"]).score(pool, loaded=loaded, progress=not args.quiet)
        picked = choose(res.scores, ids, args.budget, "top")
        record("ifd", res.scores, picked.selected, picked.order,
               time.perf_counter() - t0 + methods["loss_high"]["wall_s"],
               {"timings": res.timings, "explanations": res.explanations,
                "note": "wall_s includes the loss pass (the conditional term)"})
    return out


def less_settings(args) -> dict:
    """LESS's settings in B1: the pool's render, smaller backward batches than the forward-only
    methods (a backward keeps every layer's activations), warm-up and projection from the flags."""
    return {"render": {"max_len": args.max_len}, "max_tokens": min(args.max_tokens, 2048), "max_batch": 16,
            "proj_dim": args.less_proj_dim, "project_mb": args.less_project_mb,
            "train": {"epochs": args.less_epochs, "lora_r": args.less_rank, "lora_alpha": 2.0 * args.less_rank,
                      "target_modules": args.less_modules, "max_tokens": args.train_batch * args.max_len,
                      "max_batch": args.train_batch, "seed": args.seed}}


def saved_columns(ids: list[str]) -> dict[str, np.ndarray]:
    """Score columns of an earlier run (a merge keeps them), when they belong to this pool."""
    import pyarrow.parquet as pq

    if not SCORES.exists():
        return {}
    table = pq.read_table(SCORES).to_pydict()
    if table.get("id") != ids:
        raise SystemExit(f"{SCORES} holds scores of another pool; rerun without --merge (or move it away)")
    return {k: np.asarray(v, dtype=np.float64) for k, v in table.items() if k not in ("id", "source")}


def run_variants(args, loaded, pool, target, out: dict, save) -> dict:
    """NAIT options (METHODS.md section 2) on the same pool: one pass per (site, drift), and from
    its per-layer projections every similarity x normalisation, plus thirds of the layers."""
    from mechsieve.data import RenderConfig
    from mechsieve.models.hooks import hook_points
    from mechsieve.scorers.nait import Nait, NaitConfig, layer_terms
    from mechsieve.select import choose

    ids = [ex.id for ex in pool.examples]
    is_gsm = np.array([ex.source == "gsm8k" for ex in pool.examples])
    layers = hook_points(loaded.model).normalize_layers("all")
    thirds = np.array_split(np.arange(len(layers)), 3)
    for spec in args.variants.split(","):
        site, drift = spec.split(":")
        print(f"[variants] nait site={site} drift={drift}", flush=True)
        t0 = time.perf_counter()
        scorer = Nait(NaitConfig(render=RenderConfig(max_len=args.max_len), max_tokens=args.max_tokens,
                                 max_batch=64, site=site, drift=drift))
        dirs = scorer.directions_for(loaded, target, layers, not args.quiet)
        proj, norms = scorer.project(loaded, pool, dirs, not args.quiet)
        seconds = time.perf_counter() - t0
        shares = {}
        for sim in ("dot", "cosine"):
            for norm in ("none", "target", "pool"):
                terms = layer_terms(proj, norms, dirs, sim, norm)[:, 0]  # [n, L]
                combos = {f"{sim}/{norm}": terms.sum(1)}
                if (sim, norm) == ("dot", "none"):
                    combos.update({f"dot/none/layers{int(t[0])}-{int(t[-1])}": terms[:, t].sum(1) for t in thirds})
                for name, score in combos.items():
                    picked = choose(score, ids, args.budget, "top")
                    shares[name] = round(float(is_gsm[picked.selected].mean()), 4)
        out[f"{site}:{drift}"] = {"share_gsm8k": shares, "wall_s": round(seconds, 1)}
        print(f"  {shares}", flush=True)
        save()
    return out


def rescore_ifd(results: dict, pool) -> None:
    """Apply the IFD rule added after the first run (prompt-less examples are not scored) to the
    cached IFD scores: no model pass, the scores of every other example are unchanged."""
    import pyarrow.parquet as pq

    from mechsieve.select import choose

    table = pq.read_table(SCORES).to_pydict()
    ids = [ex.id for ex in pool.examples]
    assert table["id"] == ids, "the cached scores belong to another pool"
    scores = np.array(table["ifd"], dtype=np.float64)
    no_prompt = np.array([not ex.prompt for ex in pool.examples])
    scores[no_prompt] = np.nan
    picked = choose(scores, ids, results["pool"]["budget"], "top")
    sources = np.array([ex.source for ex in pool.examples])
    by_source = {s: int((picked.selected & (sources == s)).sum()) for s in B1_SOURCES}
    methods = results["select"]["methods"]
    old = methods["ifd"]
    methods["ifd_as_run"] = {k: old[k] for k in ("share_gsm8k", "by_source", "wall_s")} | {
        "note": "before prompt-less examples were left unscored: TinyStories (no prompt) had IFD = 1 exactly"}
    methods["ifd"] = {**old, "share_gsm8k": round(by_source["gsm8k"] / max(int(picked.selected.sum()), 1), 4),
                      "selected": int(picked.selected.sum()), "by_source": by_source,
                      "selected_ids": [ids[i] for i in picked.order if picked.selected[i]],
                      "note": old.get("note", "") + "; rescored from the cached scores with prompt-less "
                      f"examples unscored ({int(no_prompt.sum())}), `--phase rescore-ifd`"}


def res_timing(methods: dict) -> float:
    return methods["rds"]["timings"]["forward_pool"]


def train_subsets(args, pool, methods: dict) -> dict[str, list[str]]:
    """The LoRA runs `--runs` asks for: a selection method's ids, `random` (one per seed), `full`."""
    from mechsieve.select import select_examples

    subsets: dict[str, list[str]] = {}
    for run in args.runs.split(","):
        if run == "random":
            for seed in SEEDS:
                subsets[f"random_seed{seed}"] = select_examples("random", pool, args.budget, seed=seed).ids
        elif run == "full":
            subsets["full"] = [ex.id for ex in pool.examples]
        elif run in methods:
            subsets[run] = methods[run]["selected_ids"]
        else:
            raise SystemExit(f"--runs {run}: no selection of that method in the results; run --phase select "
                             f"--methods {run} first")
    return subsets


def run_train(args, pool, methods: dict, out: dict, save) -> dict:
    """LoRA runs at equal optimizer steps, each from a freshly loaded base model; held-out loss.
    Runs already in `out` (a merge) are kept, and the base model's held-out loss is reused."""
    from mechsieve.data import RenderConfig
    from mechsieve.train import TrainConfig

    render_cfg = RenderConfig(max_len=args.max_len)
    heldout = heldout_gsm8k(args.heldout)
    by_id = {ex.id: ex for ex in pool.examples}
    cfg = TrainConfig(max_steps=args.steps, max_batch=args.train_batch, max_tokens=args.train_batch * args.max_len,
                      seed=args.seed, warmup_steps=max(1, args.steps // 10))
    out.update(heldout_max_len=512, steps=args.steps, examples_per_step=args.train_batch,
               heldout_examples=len(heldout), lora=dict(cfg.__dict__))
    runs, losses = out.setdefault("runs", {}), out.setdefault("heldout_loss", {})
    if "base" not in losses:
        base = finetune_and_eval([], None, heldout, progress=not args.quiet, label="base")
        losses["base"], runs["base"] = base.loss, {"heldout": base.heldout, "eval_s": base.eval_s}
        save()
    for label, ids in train_subsets(args, pool, methods).items():
        print(f"[train] {label}: {len(ids)} examples, {args.steps} steps", flush=True)
        result = finetune_and_eval([by_id[i] for i in ids], cfg, heldout, render_cfg, progress=not args.quiet,
                                   label=label)
        losses[label], runs[label] = result.loss, result.record()
        save()
    rand = [losses.get(f"random_seed{s}") for s in SEEDS]
    if None in rand:
        return out
    out["random"] = spread(rand)
    for label in RUN_LABELS:
        if label in losses:
            out[f"{label}_beats_random_mean"] = losses[label] < out["random"]["mean"]
            out[f"{label}_beats_every_random_seed"] = all(losses[label] < r for r in rand)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=["select", "train", "all", "variants", "rescore-ifd"], default="all")
    p.add_argument("--variants", default="resid:last,resid:last_prompt,mlp:last",
                   help="phase variants: NAIT site:drift pairs, one pool pass each")
    p.add_argument("--per-source", type=int, default=100)
    p.add_argument("--target", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=24, help="optimizer steps of every LoRA run")
    p.add_argument("--train-batch", type=int, default=4, help="examples per optimizer step")
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated methods of the select phase (also: less)")
    p.add_argument("--runs", default=None,
                   help="comma-separated LoRA runs of the train phase: a selected method (nait, less, ...), "
                        f"random (3 seeds), full (default: {DEFAULT_RUNS}; with a --methods list, those methods)")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the saved results of other methods / runs (default: when --methods or --runs "
                        "is not the default list)")
    p.add_argument("--less-epochs", type=int, default=2, help="LESS warm-up epochs (one checkpoint each)")
    p.add_argument("--less-proj-dim", type=int, default=8192)
    p.add_argument("--less-rank", type=int, default=16, help="LESS warm-up LoRA rank (alpha = 2 x rank)")
    p.add_argument("--less-modules", default="all-linear",
                   help="LESS warm-up LoRA modules (the trainer's all-linear, or e.g. q_proj,k_proj,v_proj,o_proj "
                        "as in the paper: fewer LoRA parameters, a cheaper projection)")
    p.add_argument("--less-project-mb", type=float, default=4096.0,
                   help="memory for full LoRA gradients gathered per projection pass")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    from mechsieve.models import load_model

    if args.runs is None:
        args.runs = DEFAULT_RUNS if args.methods == DEFAULT_METHODS else args.methods
    merge = args.merge if args.merge is not None else (args.methods != DEFAULT_METHODS or args.runs != DEFAULT_RUNS)
    results = Results("targeted_selection", "B1 targeted selection", model="smollm2-135m-instruct (float32, CPU)")
    pool, target = mixed_pool(args.per_source, args.target, args.seed)
    if merge and results.get("pool", {}).get("fingerprint") not in (None, pool.fingerprint()):
        raise SystemExit(f"{results.path} holds results of another pool; rerun with --no-merge")
    results.set("pool", {"examples": len(pool), "by_source": pool.counts_by_source(), "target": len(target),
                         "per_source": args.per_source, "max_len": args.max_len, "budget": args.budget,
                         "seed": args.seed, "fingerprint": pool.fingerprint()})
    if args.phase in ("select", "all"):
        out = results.phase("select", merge=merge)
        loaded = load_model("smollm2-135m-instruct")
        run_select(args, loaded, pool, target, out, results.save, merge)
        if "nait" in out["methods"]:
            share = out["methods"]["nait"]["share_gsm8k"]
            results.targets().update({"nait_share_at_least_0.9": share >= 0.9, "nait_share": share,
                                      "nait_default": "robust preset (bench/targeted_selection.py)"})
        if "nait_paper" in out["methods"]:
            results.targets()["nait_paper_share"] = out["methods"]["nait_paper"]["share_gsm8k"]
        results.save(finished="select")
        del loaded
    if args.phase == "rescore-ifd":
        results.phase("select", merge=True)
        rescore_ifd(results.data, pool)
        results.save(finished="select")
        ifd = results["select"]["methods"]["ifd"]
        print(f"B1 IFD rescored: share {ifd['share_gsm8k']}, {ifd['by_source']}")
        return 0
    if args.phase == "variants":
        out = results.phase("nait_variants", merge=True)
        run_variants(args, load_model("smollm2-135m-instruct"), pool, target, out, results.save)
        results.save(finished="nait_variants")
        print("B1 NAIT variants: " + str(out))
        return 0
    if args.phase in ("train", "all"):
        out = results.phase("train", merge=merge)
        run_train(args, pool, results["select"]["methods"], out, results.save)
        for label in RUN_LABELS:
            if f"{label}_beats_random_mean" in out:
                results.targets()[f"{label}_finetune_lower_heldout_loss_than_random"] = out[f"{label}_beats_random_mean"]
        results.save(finished="train")
    m = results.get("select", {}).get("methods", {})
    line = "B1: " + ", ".join(f"{k} share {v['share_gsm8k']:.2f} ({v['wall_s']:.0f} s)" for k, v in m.items())
    if "train" in results.data:
        line += "; held-out loss " + ", ".join(f"{k} {v:.4f}" for k, v in results["train"]["heldout_loss"].items())
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
