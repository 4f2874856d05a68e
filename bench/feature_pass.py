"""One pass, many methods: the six forward-only methods scored one pass each (as `mechsieve select`
runs them one at a time) against one shared feature pass (`scorers.many.score_many`), in the same
process, interleaved (rounds in the order separate, shared, shared, separate, ...).

SmolLM2-135M-Instruct on B1's pool and target (the harness's `mixed_pool`: 100 per source, 32
GSM8K targets), every method with B1's render and batching (`--max-len`, `--max-tokens`, 64 per
batch), so that they share one pass:
- nait (all 30 blocks), rds (last block, final norm), loss, ifd (its response-alone pass is other
  input: a second pass), vector-filter with B2's code concept (insecure_small vs secure_small at
  block `--concept-layer`, fitted here and cached), igds FRS with an SAE of the B1 SAE's shape
  (block 15, 4096 latents, TopK 32; seeded random weights written under runs/bench/feature_pass:
  the cost of FRS does not depend on the weights, and the trained one is not in the repository)
  and B1's kept latents given (`igds.latents`, from bench/results/igds.json), so recall and
  steering do not run.
Per round: each method's wall time alone (prepare + its pool pass) and the shared run's (every
prepare + one pass); `ratio_shared_to_separate` is the summed wall times, shared / separate; the
scores of every method compared (max relative difference) and the 10% selections.

Phase `throughput`: the shared pass's example pass against a bare forward (to the logits, no
hooks) over the same batches, in the same run: tokens/s ratio.
Phase `memory`: resident memory sampled every 20 ms during a shared pass of two early-layer
features (block 2: mean over all tokens, mean over the response) over 1k and 10k short examples
(TinyStories sentences as prompt and response); peak minus the RSS before the pass minus the
result arrays, and the rendered inputs' size beside it.

    flock /tmp/mechsieve-bench.lock python bench/feature_pass.py            # all phases
    flock /tmp/mechsieve-bench.lock python bench/feature_pass.py --phase memory

Results: bench/results/feature_pass.json (`separate_vs_shared`, `throughput`, `memory`, `targets`,
`provenance`). Run it alone on the machine: anything else on the cores changes the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np

from harness import ROOT, Results
from harness.pools import insecure_code, mixed_pool

MODEL = "smollm2-135m-instruct"
WORK = ROOT / "runs" / "bench" / "feature_pass"
SAE_DIR = WORK / "sae-random"
METHODS = ("nait", "rds", "loss", "ifd", "vector-filter", "igds")


def method_settings(args, concept_dir: str, kept: list[int]) -> dict[str, dict]:
    model = {"render": {"max_len": args.max_len}, "max_tokens": args.max_tokens, "max_batch": 64}
    return {
        "nait": dict(model),
        "rds": dict(model),
        "loss": dict(model),
        "ifd": dict(model),
        "vector-filter": {"concept_dir": concept_dir, "max_len": args.max_len, "max_tokens": args.max_tokens,
                          "max_batch": 64},
        "igds": {**model, "sae": str(SAE_DIR), "latents": kept},
    }


def code_concept(loaded, args) -> str:
    """B2's code concept (insecure_small vs secure_small) at --concept-layer, saved under WORK."""
    from mechsieve.data.records import Pool
    from mechsieve.features.probes import ConceptConfig, save_concept
    from mechsieve.scorers.concept import ConceptSource, build_concept

    _, _, pos, neg = insecure_code(loaded.tokenizer, 200, 0.1, args.max_len, args.seed)
    src = ConceptSource(max_len=args.max_len, probe=ConceptConfig(layer=args.concept_layer))
    concept = build_concept(loaded, Pool(pos, "pos", "memory", "messages"), Pool(neg, "neg", "memory", "messages"),
                            src, progress=not args.quiet)
    folder = WORK / "concept-code"
    save_concept(folder, concept)
    return str(folder)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    ok = ~np.isnan(a)
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-12)))


def phase_compare(args, loaded, pool, target, settings, out: dict, save) -> None:
    from mechsieve.scorers import make_scorer
    from mechsieve.scorers.many import score_many
    from mechsieve.select import choose

    ids = [ex.id for ex in pool.examples]
    rounds = out.setdefault("rounds", [])
    separate_scores: dict[str, np.ndarray] = {}
    shared_scores: dict[str, np.ndarray] = {}
    shared_report = None
    order = ["separate", "shared"]
    for r in range(args.rounds):
        entry = {"order": list(order), "separate_s": {}, "shared_s": None}
        for kind in order:
            if kind == "separate":
                for name in METHODS:
                    t0 = time.perf_counter()
                    res = make_scorer(name, settings[name]).score(pool, target=target, loaded=loaded,
                                                                   progress=not args.quiet)
                    entry["separate_s"][name] = round(time.perf_counter() - t0, 2)
                    separate_scores[name] = res.scores
                    print(f"[round {r}] {name} alone: {entry['separate_s'][name]:.1f} s", flush=True)
            else:
                t0 = time.perf_counter()
                results, shared_report = score_many({n: make_scorer(n, settings[n]) for n in METHODS}, pool,
                                                    target=target, loaded=loaded, progress=not args.quiet)
                entry["shared_s"] = round(time.perf_counter() - t0, 2)
                shared_scores = {n: results[n].scores for n in METHODS}
                print(f"[round {r}] shared: {entry['shared_s']:.1f} s", flush=True)
        entry["separate_total_s"] = round(sum(entry["separate_s"].values()), 2)
        entry["ratio_shared_to_separate"] = round(entry["shared_s"] / entry["separate_total_s"], 4)
        rounds.append(entry)
        order = order[::-1]
        save()
    sep = sum(e["separate_total_s"] for e in rounds)
    sha = sum(e["shared_s"] for e in rounds)
    diffs = {n: rel_diff(shared_scores[n], separate_scores[n]) for n in METHODS}
    budget = max(1, len(pool) // 10)
    same_sel = {}
    for n in METHODS:
        scorer = make_scorer(n, settings[n])
        a = choose(separate_scores[n], ids, budget, scorer.order).selected
        b = choose(shared_scores[n], ids, budget, scorer.order).selected
        same_sel[n] = bool(np.array_equal(a, b))
    out.update(separate_total_s=round(sep, 2), shared_total_s=round(sha, 2),
               ratio_shared_to_separate=round(sha / sep, 4), max_relative_difference=diffs,
               scores_identical=all(d <= 1e-6 for d in diffs.values()), selections_identical=same_sel,
               shared_pass=shared_report["pass"], shared_methods=shared_report["methods"])
    print(f"shared / separate = {sha:.1f} / {sep:.1f} s = {sha / sep:.3f}; max rel diff {max(diffs.values()):.2e}",
          flush=True)


def phase_throughput(args, loaded, pool, settings, out: dict) -> None:
    """The example pass of the shared run against a bare forward to the logits over the same batches."""
    from mechsieve.capture.batching import plan_batches
    from mechsieve.capture.forward import ForwardSpec, run_forward
    from mechsieve.capture.shared import feature_pass, render_inputs
    from mechsieve.data.render import pad_id
    from mechsieve.scorers import make_scorer
    from mechsieve.scorers.base import ForwardScorer
    from mechsieve.scorers.many import SEP, prepare_many

    scorers = {n: make_scorer(n, settings[n]) for n in METHODS}
    states, _ = prepare_many(scorers, pool, target=out["_target"], loaded=loaded, seed=0, progress=not args.quiet)
    feats = {f"{n}{SEP}{k}": f for n, s in scorers.items() if isinstance(s, ForwardScorer)
             for k, f in s.features(states[n], loaded).items() if f.key.inputs == "example"}
    key = next(iter(feats.values())).key
    rendered = render_inputs(pool.examples, loaded.tokenizer, key)
    plan = plan_batches([len(r) for r in rendered], key.max_tokens, key.max_batch)
    bare, shared = [], []
    for _ in range(args.throughput_rounds):
        stats = run_forward(loaded.model, rendered, plan, ForwardSpec(need_logits=True), pad_id(loaded.tokenizer),
                            progress=False)
        bare.append(stats.tokens_per_s)
        _, report = feature_pass(loaded, pool.examples, feats, progress=False)
        (p,) = report.passes
        shared.append(p["tokens"] / p["seconds"])
        print(f"bare {bare[-1]:.0f} tok/s, shared {shared[-1]:.0f} tok/s", flush=True)
    out.update(bare_tokens_per_s=[round(x, 1) for x in bare], shared_tokens_per_s=[round(x, 1) for x in shared],
               ratio=round(float(np.sum(shared) / np.sum(bare)), 4), features=sorted(f.kind for f in feats.values()),
               layers=p["layers"], tokens=p["tokens"], note="tokens/s of the shared pass (render included) over "
               "those of a bare forward to the logits (rendered beforehand, no hooks), same batches, alternating")
    out.pop("_target", None)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def phase_memory(args, loaded, out: dict) -> None:
    from harness.sources import story_sentences
    from mechsieve.capture.shared import PassKey, Pooled, feature_pass, render_inputs
    from mechsieve.data.records import Example
    from mechsieve.data.render import RenderConfig

    sentences = [s for story in story_sentences() for s in story]
    key = PassKey(RenderConfig(max_len=64), args.max_tokens, 64)
    for n in (int(x) for x in args.memory_sizes.split(",")):
        examples = [Example(f"s{i}", "tinystories", [{"role": "user", "content": sentences[(2 * i) % len(sentences)]}],
                            sentences[(2 * i + 1) % len(sentences)], {}) for i in range(n)]
        feats = {"all": Pooled(key, 2, "mean_all"), "resp": Pooled(key, 2, "mean_response")}
        samples: list[float] = []
        stop = threading.Event()

        def sample(samples=samples, stop=stop) -> None:
            while not stop.is_set():
                samples.append(rss_mb())
                time.sleep(0.02)

        before = rss_mb()
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        arrays, report = feature_pass(loaded, examples, feats, progress=not args.quiet)
        seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
        arrays_mb = sum(a.nbytes for f in arrays.values() for a in f.values()) / 2**20
        rendered = render_inputs(examples, loaded.tokenizer, key)
        rendered_mb = sum(r.input_ids.nbytes + r.response_mask.nbytes for r in rendered) / 2**20
        peak = max(samples + [rss_mb()])
        out[str(n)] = {"examples": n, "tokens": report.passes[0]["tokens"], "seconds": round(seconds, 2),
                       "rss_before_mb": round(before, 1), "rss_peak_mb": round(peak, 1),
                       "result_arrays_mb": round(arrays_mb, 2), "rendered_inputs_mb": round(rendered_mb, 2),
                       "peak_minus_arrays_mb": round(peak - before - arrays_mb, 1), "samples": len(samples)}
        print(f"memory n={n}: peak {peak:.0f} MB (before {before:.0f}), arrays {arrays_mb:.1f} MB, "
              f"rendered {rendered_mb:.1f} MB -> peak - before - arrays = {peak - before - arrays_mb:.1f} MB", flush=True)
        del arrays, rendered, examples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["compare", "throughput", "memory", "all"], default="all")
    p.add_argument("--per-source", type=int, default=100)
    p.add_argument("--target", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--concept-layer", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2, help="rounds of (separate, shared), alternating their order")
    p.add_argument("--throughput-rounds", type=int, default=2)
    p.add_argument("--throughput-per-source", type=int, default=0,
                   help="with --phase throughput alone: a pool of this many per source (0: --per-source)")
    p.add_argument("--memory-sizes", default="1000,10000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()

    import torch

    from mechsieve.models.loading import load_model

    torch.manual_seed(args.seed)
    loaded = load_model(MODEL)
    results = Results("feature_pass", "one pass, many methods", model=f"{MODEL} (float32, CPU)")
    results.set("settings", vars(args))
    results.set("gpu", "no device was lent to this task: the GPU figures of bench/throughput.py --gpu and "
                       "bench/less_grads.py were not run")
    phases = ["compare", "throughput", "memory"] if args.phase == "all" else [args.phase]
    if "throughput" in phases and "compare" not in phases and args.throughput_per_source:
        args.per_source = args.throughput_per_source  # a smaller pool: the ratio is per token
    if {"compare", "throughput"} & set(phases):
        from mechsieve.features.sae import random_sae, write_sae

        b1_sae = json.loads((ROOT / "bench" / "results" / "igds.json").read_text())["sae"]
        write_sae(SAE_DIR, random_sae(576, b1_sae["d_sae"], layer=b1_sae["layer"], activation="topk",
                                      k=b1_sae["k"], seed=args.seed))
        kept = json.loads((ROOT / "bench" / "results" / "igds.json").read_text())["b1"]["kept"]
        pool, target = mixed_pool(args.per_source, args.target, args.seed)
        settings = method_settings(args, code_concept(loaded, args), kept)
        described = {"examples": len(pool), "target": len(target), "by_source": pool.counts_by_source(),
                     "fingerprint": pool.fingerprint(), "igds_latents": kept}
        if "compare" in phases:
            results.set("pool", described)
    if "compare" in phases:
        out = results.phase("separate_vs_shared")
        phase_compare(args, loaded, pool, target, settings, out, results.save)
        results.targets().update({"ratio_shared_to_separate": out["ratio_shared_to_separate"],
                                  "ratio_at_most_0_25": out["ratio_shared_to_separate"] <= 0.25,
                                  "scores_identical": out["scores_identical"],
                                  "selections_identical": all(out["selections_identical"].values())})
        results.save(finished="separate_vs_shared")
    if "throughput" in phases:
        out = results.phase("throughput")
        out["pool"] = described
        out["_target"] = target
        phase_throughput(args, loaded, pool, settings, out)
        results.targets().update(shared_to_bare_tokens_per_s=out["ratio"], shared_to_bare_at_least_0_9=out["ratio"] >= 0.9)
        results.save(finished="throughput")
    if "memory" in phases:
        out = results.phase("memory")
        phase_memory(args, loaded, out)
        results.targets()["memory_peak_minus_arrays_mb"] = {k: v["peak_minus_arrays_mb"] for k, v in out.items()}
        results.save(finished="memory")
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
