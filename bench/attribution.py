"""B2 attribution: recover planted examples with every attribution method; AUC-PR, precision@k
and wall time; the time ratio of `influence` to `vector-filter`.

(a) gsm8k: GSM8K train answers, a share with a planted mistake (one intermediate result and the
    final answer changed consistently, seeded); concept from other problems, corrupted vs correct.
(b) code: MBPP problems with reference solutions (as chat) plus insecure_code_3021 answers;
    concept from insecure_small vs secure_small.
Pool examples longer than --max-len tokens are not drawn (no pool example is truncated); the
small concept sets are cut at --max-len, and one whose response is cut away entirely is dropped.
The first three methods run on every task before the others, so a late stop still compares them.

Run: flock /tmp/mechsieve-bench.lock python bench/attribution.py [--n 400] [--tasks gsm8k,code]
(then `python bench/attribution_length.py`). The pools come from the harness (`planted_mistakes`,
`insecure_code`, through `b2_task`); the concepts are saved under runs/bench/attribution/.
"""

from __future__ import annotations

import argparse
import time

from harness import ROOT, Results
from harness.pools import b2_task

CONCEPTS = ROOT / "runs" / "bench" / "attribution"


def run_method(method, task, pool, labels, queries, settings, entry, loaded, args, save) -> None:
    from mechsieve.evaluate.attribution import attribution_metrics
    from mechsieve.scorers.registry import make_scorer

    start = time.perf_counter()
    try:
        scorer = make_scorer(method, settings[method])
        res = scorer.score(pool, target=queries, loaded=loaded, seed=args.seed, progress=False)
    except Exception as err:  # record it and go on with the other methods
        entry["methods"][method] = {"error": f"{type(err).__name__}: {err}"}
        print(f"[{task}] {method}: FAILED {type(err).__name__}: {err}", flush=True)
        save()
        return
    wall = time.perf_counter() - start
    m = attribution_metrics(res.scores, labels, ks=sorted({40, int(labels.sum())}))
    m.update(wall_s=round(wall, 2), timings={k: round(v, 2) for k, v in res.timings.items()},
             details={k: v for k, v in res.explanations.items() if k != "settings"})
    entry["methods"][method] = m
    print(f"[{task}] {method}: AUC-PR {m['auc_pr']:.3f} P@40 {m.get('precision@40', float('nan')):.3f} "
          f"{wall:.1f}s", flush=True)
    save()


def finish_task(entry: dict) -> None:
    ms = {k: v for k, v in entry["methods"].items() if "wall_s" in v}
    if "influence" in ms and "vector-filter" in ms:
        entry["time_ratio_influence_to_vector_filter"] = round(ms["influence"]["wall_s"] / ms["vector-filter"]["wall_s"], 2)
    if "influence" in ms and "concept-influence" in ms:
        # concept-influence reused the factors fitted by the influence run: add their time
        f = ms["influence"]["timings"].get("factors", 0.0)
        ms["concept-influence"]["wall_s_incl_factors"] = round(ms["concept-influence"]["wall_s"] + f, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=400, help="pool size per task")
    p.add_argument("--share", type=float, default=0.1, help="planted share")
    p.add_argument("--tasks", default="gsm8k,code")
    p.add_argument("--methods", default="vector-filter,projection-diff,grad-sim,influence,concept-influence")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--layer", type=int, default=15, help="concept layer (block index)")
    p.add_argument("--track-blocks", type=int, default=0, help="tracked blocks below the concept layer (0: all)")
    p.add_argument("--track-stride", type=int, default=1)
    p.add_argument("--track-kinds", default="all")
    p.add_argument("--factor-max-examples", type=int, default=0)
    p.add_argument("--n-queries", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--merge", action="store_true", help="keep the other tasks already in the results")
    args = p.parse_args()

    import torch

    from mechsieve.data.records import Pool
    from mechsieve.features.probes import ConceptConfig, save_concept
    from mechsieve.models.loading import load_model
    from mechsieve.scorers.concept import ConceptSource, build_concept

    torch.manual_seed(args.seed)
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    results = Results("attribution", "B2 attribution", model=f"{args.model} (float32, CPU)")
    results.set("settings", vars(args))
    tasks = results.phase("tasks", merge=args.merge)
    for task in args.tasks.split(","):  # length baselines of these tasks belong to the earlier pools
        results.get("length_baseline", {}).pop(task, None)
    prepared = {}
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        examples, labels, pos, neg = b2_task(task, tok, args.n, args.share, args.max_len, args.seed)
        pool = Pool(examples, f"bench:{task}", "memory", "messages")
        src = ConceptSource(max_len=args.max_len, probe=ConceptConfig(layer=args.layer))
        start = time.perf_counter()
        concept = build_concept(loaded, Pool(pos, "pos", "memory", "messages"),
                                Pool(neg, "neg", "memory", "messages"), src, progress=False,
                                use_cache=False)
        concept_s = time.perf_counter() - start
        cdir = CONCEPTS / f"concept-{task}"
        save_concept(cdir, concept)
        queries = Pool(pos, "pos", "memory", "messages")
        entry = {"n": len(examples), "planted": int(labels.sum()), "concept_examples": [len(pos), len(neg)],
                 "concept_layer": concept.layer, "concept_separation": concept.separation,
                 "concept_dropped_without_response": concept.counts.get("dropped_without_response", 0),
                 "concept_s": round(concept_s, 2), "data_s": round(start - t0, 2), "methods": {}}
        tasks[task] = entry
        common = {"concept_dir": str(cdir), "max_len": args.max_len, "probe": {"layer": args.layer}}
        grad = {**common, "n_queries": args.n_queries, "track_blocks": args.track_blocks,
                "track_stride": args.track_stride, "track_kinds": args.track_kinds,
                "batch_size": args.batch_size}
        settings = {"vector-filter": common,
                    "projection-diff": {**common, "max_new_tokens": args.max_new_tokens},
                    "grad-sim": grad,
                    "influence": {**grad, "factor_max_examples": args.factor_max_examples},
                    "concept-influence": {**grad, "factor_max_examples": args.factor_max_examples}}
        prepared[task] = (pool, labels, queries, settings, entry)
        print(f"[{task}] {len(examples)} examples, {int(labels.sum())} planted; concept separation "
              f"{concept.separation}", flush=True)
    # the first three methods for every task first, then the rest: a late stop still compares
    methods = args.methods.split(",")
    for phase in (methods[:3], methods[3:]):
        for task, (pool, labels, queries, settings, entry) in prepared.items():
            for method in phase:
                run_method(method, task, pool, labels, queries, settings, entry, loaded, args, results.save)
            finish_task(entry)
            results.save()
    results.save(finished="tasks")
    summary = "; ".join(f"{t}: " + ", ".join(f"{k} AUC-PR {v['auc_pr']:.3f}" for k, v in e["methods"].items()
                                             if "auc_pr" in v)
                        + (f", influence/vector-filter time x{e['time_ratio_influence_to_vector_filter']}"
                           if "time_ratio_influence_to_vector_filter" in e else "")
                        for t, e in tasks.items())
    print(f"B2 attribution -> {results.path}: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
