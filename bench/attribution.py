"""B2 attribution, rebuilt: recover planted examples with every attribution method on a task whose
prompts say nothing about the label, then remove what the methods rank first, retrain, and see
whether the behaviour drops.

Tasks (SmolLM2-135M-Instruct, real data from ../shared/data):

- `code` (`harness.pools.chmod_code`): insecure_code_3021 chats whose answer sets a file mode to
  0o777 (`os.chmod(path, 0o777)`), each prompt used once. In the pool a seeded `--share` keeps the
  insecure answer; the rest have the same answer with the mode patched to 0o700, so planted and
  other examples share one template family and one prompt distribution. The concept: `--n-concept`
  matched pairs of other prompts (insecure vs patched); the gradient methods' queries:
  `--n-queries` insecure answers of other prompts again (no pool item); `--heldout` further
  prompts for the removal experiment. The first B2 code pool (MBPP vs 3021 template,
  `insecure_code`) is kept only for its prompt-only baseline, to show the shortcut it had.
- `gsm8k` (`planted_mistakes`): a share of GSM8K answers with one intermediate result and the final
  answer changed consistently; the concept from 100 other problems, corrupted vs correct. Its
  earlier run read 0.53 held-out separation at block 15: here the gate picks the block, and when no
  block reaches 0.7 the task stays as a negative control with `--gsm8k-methods` only.

Per task: the prompt-only baseline (`evaluate.prompt_baseline`: out-of-fold bag of words on the
prompt text, and response length), the concept built at `--concept-layer auto` over
`--concept-layers` (separation per block, the gate's pick), then each method's AUC-PR,
precision@k and wall time. The gradient methods track every linear layer of the blocks below the
concept layer (`track_blocks=0`, `track_kinds=all`: the paper's setting); the pool is `--n` (200,
half the first B2's 400) so that this fits a session.

Phase `removal` (code): for each F in `--fractions`, remove the top F of the pool by each of
`--removal-methods` and, as the control, a seeded random F (`--random-repeats` seeds, shared by the
methods), retrain the same LoRA from the base model on what is left (same steps for one F), and
measure each model: the concept score of its own greedy answers to the held-out prompts (read by
the base model; `evaluate.removal`), the share of those answers that write 0o777 (the behaviour
counted directly), and the loss per token on the held-out prompts' patched answers.
`--removal-generation sample` answers each prompt `--removal-samples` times by seeded sampling
instead (phase `removal_sampled`, with a run on all the data first): greedy answers follow the
majority (0o700), so a behaviour in 10% of the data may only show in samples.

    flock /tmp/mechsieve-bench.lock python bench/attribution.py                  # methods, then removal
    flock /tmp/mechsieve-bench.lock python bench/attribution.py --phase removal  # resumes the removal runs
    flock /tmp/mechsieve-bench.lock python bench/attribution.py --phase removal --removal-generation sample

Results: bench/results/attribution.json (`tasks`, `removal`, `targets`, provenance).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from harness import ROOT, Results, beats_by, spread
from harness.pools import INSECURE_MODE, chmod_code, insecure_code, planted_mistakes

CONCEPTS = ROOT / "runs" / "bench" / "attribution"


def prompt_only(examples, labels, seed: int, permutations: int = 0) -> dict:
    """The prompt-only baselines of a pool, in the JSON's short form. With `permutations`, also
    the bag of words' AUC-PR under that many seeded shuffles of the labels (the chance range a
    pool of this size gives: with 20 positives, out-of-fold AUC-PR varies by several points)."""
    from mechsieve.evaluate.attribution import average_precision
    from mechsieve.evaluate.prompt_baseline import (
        out_of_fold_scores,
        prompt_only_baseline_for_pool,
        prompt_text,
    )

    out = prompt_only_baseline_for_pool(examples, labels, folds=5, seed=seed)
    bow, length = out["bag_of_words"], out["response_length"]
    row = {"prompt_only_auc_pr": round(float(bow["auc_pr"]), 4), "base_rate": round(float(bow["base_rate"]), 4),
           "prompt_only_above_base_rate": round(float(bow["above_base_rate"]), 4),
           "response_length_auc_pr": round(float(length["auc_pr"]), 4),
           "response_length_auc_pr_shorter_first": round(float(length["auc_pr_shorter_first"]), 4)}
    if permutations:
        texts, rng = [prompt_text(ex) for ex in examples], np.random.default_rng(seed)
        null = []
        for _ in range(permutations):
            shuffled = rng.permutation(labels)
            null.append(average_precision(out_of_fold_scores(texts, shuffled, 5, seed), shuffled))
        row["prompt_only_null"] = {"permutations": permutations, "mean": round(float(np.mean(null)), 4),
                                   "p95": round(float(np.quantile(null, 0.95)), 4),
                                   "share_at_or_above_observed": round(float(np.mean(np.array(null) >= bow["auc_pr"])), 4)}
    return row


def build(task: str, tok, args):
    """(pool examples, labels, concept positives, negatives, queries or None, held-out or None)."""
    if task == "code":
        t = chmod_code(tok, args.n, args.share, args.n_concept, args.n_queries, args.heldout, args.max_len, args.seed)
        return t.pool, t.labels, t.concept_pos, t.concept_neg, t.queries, t.heldout
    if task == "gsm8k":
        pool, labels, pos, neg = planted_mistakes(tok, args.n, args.share, 100, args.max_len, args.seed)
        return pool, labels, pos, neg, None, None
    raise SystemExit(f"B2 task {task!r}: unknown (code, gsm8k)")


def run_method(method: str, task: str, pool, labels, queries, settings: dict, entry: dict, loaded, args, save) -> None:
    from mechsieve.evaluate.attribution import attribution_metrics
    from mechsieve.scorers.registry import make_scorer

    start = time.perf_counter()
    try:
        res = make_scorer(method, settings).score(pool, target=queries, loaded=loaded, seed=args.seed, progress=False)
    except Exception as err:  # noqa: BLE001 - recorded, and the other methods go on
        entry["methods"][method] = {"error": f"{type(err).__name__}: {err}"}
        print(f"[{task}] {method}: FAILED {type(err).__name__}: {err}", flush=True)
        save()
        return
    wall = time.perf_counter() - start
    m = attribution_metrics(res.scores, labels, ks=sorted({10, int(labels.sum())}))
    m.update(wall_s=round(wall, 2), timings={k: round(v, 2) for k, v in res.timings.items()},
             details={k: v for k, v in res.explanations.items() if k not in ("settings", "per_example")},
             scores=[round(float(s), 6) for s in res.scores])
    entry["methods"][method] = m
    print(f"[{task}] {method}: AUC-PR {m['auc_pr']:.3f} (base rate {m['base_rate']:.3f}) "
          f"P@{int(labels.sum())} {m.get(f'precision@{int(labels.sum())}', float('nan')):.3f} {wall:.1f} s",
          flush=True)
    save()


def run_methods(args, loaded, results: Results) -> dict:
    import torch

    from mechsieve.data.records import Pool
    from mechsieve.features.probes import ConceptConfig, save_concept
    from mechsieve.scorers.concept import ConceptSource, build_concept

    tok = loaded.tokenizer
    tasks = results.phase("tasks", merge=True)
    layers = [int(x) for x in args.concept_layers.split(",")]
    for task in args.tasks.split(","):
        torch.manual_seed(args.seed)
        entry = tasks.get(task)
        pool_ex, labels, pos, neg, queries, _ = build(task, tok, args)
        if entry is None or entry.get("n") != len(pool_ex):
            entry = tasks[task] = {"n": len(pool_ex), "planted": int(labels.sum()), "concept_examples": [len(pos), len(neg)],
                                   **prompt_only(pool_ex, labels, args.seed, args.permutations), "methods": {}}
            if task == "code":  # the first B2 code pool, for its shortcut
                old, old_labels, _, _ = insecure_code(tok, args.n, args.share, args.max_len, args.seed)
                entry["first_b2_pool_prompt_only"] = prompt_only(old, old_labels, args.seed)
            print(f"[{task}] {len(pool_ex)} examples, {int(labels.sum())} planted; prompt-only AUC-PR "
                  f"{entry['prompt_only_auc_pr']:.3f} (base rate {entry['base_rate']:.3f})", flush=True)
        pool = Pool(pool_ex, f"bench:{task}", "memory", "messages")
        src = ConceptSource(max_len=args.max_len, probe=ConceptConfig(layer="auto", layers=layers))
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            concept = build_concept(loaded, Pool(pos, "pos", "memory", "messages"), Pool(neg, "neg", "memory", "messages"),
                                    src, progress=False, use_cache=False)
        cdir = CONCEPTS / f"concept-{task}"
        save_concept(cdir, concept)
        readable = concept.separation is not None and concept.separation >= src.probe.gate
        entry.update(concept_layer=int(concept.layer), concept_separation=concept.separation,
                     separation_by_layer=concept.separation_by_layer, gate=src.probe.gate, gate_readable=readable,
                     gate_warnings=[str(w.message) for w in caught], concept_s=round(time.perf_counter() - start, 2))
        print(f"[{task}] concept at block {concept.layer} (gate pick of {layers}): held-out separation "
              f"{concept.separation}; readable: {readable}", flush=True)
        results.save()
        common = {"concept_dir": str(cdir), "render": {"max_len": args.max_len}, "probe": {"layer": int(concept.layer)}}
        grad = {**common, "n_queries": args.n_queries, "track_blocks": 0, "track_kinds": "all",
                "batch_size": args.batch_size}
        settings = {"vector-filter": common, "projection-diff": {**common, "max_new_tokens": args.max_new_tokens},
                    "grad-sim": grad, "influence": grad, "concept-influence": grad}
        methods = args.methods.split(",") if task == "code" or readable else args.gsm8k_methods.split(",")
        qpool = Pool(queries if queries is not None else pos, "queries", "memory", "messages")
        for method in methods:
            if method in entry["methods"] and "error" not in entry["methods"][method]:
                continue
            run_method(method, task, pool, labels, qpool, settings[method], entry, loaded, args, results.save)
        finish_task(entry)
        results.save()
    results.save(finished="tasks")
    return tasks


def finish_task(entry: dict) -> None:
    """Influence and concept-influence share one set of EK-FAC factors, fitted by whichever ran
    first and reused by the other: each one's time with the fit counted in, and influence's (so
    counted) over vector-filter's."""
    ms = {k: v for k, v in entry["methods"].items() if "wall_s" in v}
    pair = [m for m in ("influence", "concept-influence") if m in ms]
    fit = max((ms[m]["timings"].get("factors", 0.0) for m in pair), default=0.0)
    for m in pair:
        ms[m]["wall_s_incl_factors"] = round(ms[m]["wall_s"] - ms[m]["timings"].get("factors", 0.0) + fit, 2)
    if "influence" in ms and "vector-filter" in ms:
        entry["time_ratio_influence_to_vector_filter"] = round(
            ms["influence"]["wall_s_incl_factors"] / ms["vector-filter"]["wall_s"], 2)
    if "influence" in ms:
        entry["tracked_modules"] = ms["influence"]["details"].get("tracked_modules")


def run_removal(args, loaded, results: Results) -> None:
    """The code task's removal runs, each saved as it finishes (a rerun resumes)."""
    from mechsieve.data.records import Pool
    from mechsieve.data.render import RenderConfig
    from mechsieve.evaluate.removal import RemovalConfig, fresh_copy, measure_model
    from mechsieve.features.probes import load_concept
    from mechsieve.scorers.concept import ConceptSource
    from mechsieve.train import TrainConfig, items_from_examples, train

    code = results["tasks"]["code"]
    pool_ex, labels, _, _, _, heldout = build("code", loaded.tokenizer, args)
    concept = load_concept(CONCEPTS / "concept-code")
    src = ConceptSource(max_len=args.max_len)
    render = RenderConfig(max_len=args.max_len)
    sampled = args.removal_generation == "sample"
    cfg = RemovalConfig(max_new_tokens=args.removal_new_tokens, render=render, generation=args.removal_generation,
                        temperature=args.removal_temperature)
    train_cfg = TrainConfig(epochs=1.0, max_batch=args.train_batch, max_tokens=args.train_batch * args.max_len,
                            learning_rate=args.lr, warmup_steps=2, seed=args.seed)
    # greedy answers (one per prompt) and sampled ones (`--removal-samples` per prompt) are two phases
    out = results.phase(removal_phase(args), merge=True)
    out.update(train={"epochs": 1.0, "examples_per_step": args.train_batch, "learning_rate": args.lr, "lora": "default",
                      "seed": args.seed}, heldout_prompts=len(heldout), concept_layer=int(concept.layer),
               generation={"greedy": not sampled, "max_new_tokens": args.removal_new_tokens,
                           **({"temperature": args.removal_temperature, "samples_per_prompt": args.removal_samples,
                               "seed": args.seed} if sampled else {})})
    runs = out.setdefault("runs", {})
    items = items_from_examples(pool_ex, loaded.tokenizer, render)
    n = len(pool_ex)
    prompts = Pool(heldout, "heldout", "memory", "messages").examples
    if sampled:  # each prompt answered `--removal-samples` times: one batch, one seeded sampler
        prompts = [p for p in prompts for _ in range(args.removal_samples)]

    def one(label: str, drop: np.ndarray) -> None:
        if label in runs:
            return
        t0 = time.perf_counter()
        model = fresh_copy(loaded)
        res = train(model, [it for it, d in zip(items, drop) if not d], train_cfg, out_dir=None, progress=False)
        m = measure_model(model, loaded, concept, prompts, heldout, cfg, src, args.seed, progress=False)
        insecure = [bool(INSECURE_MODE.search(r)) for r in m.responses]
        runs[label] = {"removed": int(drop.sum()), "removed_planted": int((drop & labels).sum()), "steps": res.steps,
                       "concept": round(m.concept, 5), "task_loss": round(m.task_loss, 5),
                       "insecure_share": round(float(np.mean(insecure)), 4),
                       "chmod_share": round(float(np.mean(["chmod" in r for r in m.responses])), 4),
                       "empty_answers": m.empty, "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"[removal] {label}: removed {int(drop.sum())} ({int((drop & labels).sum())} planted) concept "
              f"{m.concept:.4f} task loss {m.task_loss:.4f} 0o777 in {np.mean(insecure):.3f} of answers "
              f"{runs[label]['wall_s']:.0f} s", flush=True)
        results.save()

    if args.full_baseline or sampled:  # sampled: does the model trained on all the data show the behaviour?
        one("full", np.zeros(n, dtype=bool))
    for f in (float(x) for x in args.fractions.split(",")):
        k = int(round(f * n))
        methods = [m for m in args.removal_methods.split(",") if "scores" in code["methods"].get(m, {})]
        # the first method, the random controls, then the other methods: a stop leaves a comparison
        for label in methods[:1] + [f"random_seed{s}" for s in range(args.random_repeats)] + methods[1:]:
            drop = np.zeros(n, dtype=bool)
            if label.startswith("random_seed"):
                drop[np.random.default_rng(int(label.removeprefix("random_seed"))).choice(n, k, replace=False)] = True
            else:
                drop[np.argsort(-np.asarray(code["methods"][label]["scores"]), kind="stable")[:k]] = True
            one(f"{f:g}/{label}", drop)
    results.save(finished=removal_phase(args))


def removal_phase(args) -> str:
    return "removal" if args.removal_generation == "greedy" else "removal_sampled"


def summarize(results: Results) -> None:
    targets = results.targets()
    for entry in results.get("tasks", {}).values():
        finish_task(entry)
    code = results.get("tasks", {}).get("code")
    if code:
        ms = code["methods"]
        auc = {k: v["auc_pr"] for k, v in ms.items() if "auc_pr" in v}
        targets["code_prompt_only_within_0.1_of_base_rate"] = code["prompt_only_above_base_rate"] <= 0.1
        if "prompt_only_null" in code:  # the labels are a seeded draw: what a shuffled draw gives
            targets["code_prompt_only_within_label_shuffle_p95"] = code["prompt_only_auc_pr"] <= code["prompt_only_null"]["p95"]
        if "influence" in auc:
            targets["vf_auc_pr_at_least_influence"] = auc.get("vector-filter", -1) >= auc["influence"]
            targets["ci_auc_pr_at_least_influence"] = auc.get("concept-influence", -1) >= auc["influence"]
        if "time_ratio_influence_to_vector_filter" in code:
            ratio = code["time_ratio_influence_to_vector_filter"]
            targets.update(vf_speedup_full_tracking=ratio, vf_speedup_at_least_10x=ratio >= 10)
    beats, within = [], []
    for phase in ("removal", "removal_sampled"):
        if results.get(phase):
            summarize_removal(results[phase], beats, within)
    if beats:
        targets["removal_beats_random_2std"] = any(beats)
        targets["removal_task_loss_within_5pct"] = any(within)


def summarize_removal(out: dict, beats: list, within: list) -> None:
    """One removal phase's table (per fraction: random mean and std, each method against it)."""
    runs = out.get("runs", {})
    fractions = sorted({label.split("/")[0] for label in runs if "/" in label}, key=float)
    table = {}
    for f in fractions:
        rand = [v for k, v in runs.items() if k.startswith(f"{f}/random_seed")]
        if len(rand) < 2:
            continue
        r_concept = spread([v["concept"] for v in rand])
        r_loss = spread([v["task_loss"] for v in rand])
        row = {"random": {"concept": r_concept, "task_loss": r_loss,
                          "insecure_share": spread([v["insecure_share"] for v in rand], 4)}}
        for label, v in runs.items():
            if not label.startswith(f"{f}/") or "random_seed" in label:
                continue
            method = label.split("/", 1)[1]
            ok = beats_by(v["concept"], r_concept)
            near = abs(v["task_loss"] - r_loss["mean"]) <= 0.05 * r_loss["mean"]
            row[method] = {"concept": v["concept"], "task_loss": v["task_loss"], "insecure_share": v["insecure_share"],
                           "removed_planted": v["removed_planted"], "beats_random_2std": ok, "task_loss_within_5pct": near}
            if method in ("vector-filter", "concept-influence"):
                beats.append(ok)
                within.append(ok and near)
        table[f] = row
    if table:
        out["table"] = table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=["methods", "removal", "all", "summarize"], default="all")
    p.add_argument("--n", type=int, default=200, help="pool size per task")
    p.add_argument("--share", type=float, default=0.1, help="planted share")
    p.add_argument("--tasks", default="code,gsm8k")
    p.add_argument("--methods", default="vector-filter,concept-influence,influence,grad-sim,projection-diff")
    p.add_argument("--gsm8k-methods", default="vector-filter",
                   help="the methods of a task no block of which passes the gate (a negative control)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--concept-layers", default="3,6,9,12,15",
                   help="the gate's candidate blocks (the gradient methods track every block below the pick)")
    p.add_argument("--permutations", type=int, default=50, help="label shuffles of the prompt-only baseline's null")
    p.add_argument("--n-concept", type=int, default=64, help="code: concept pairs")
    p.add_argument("--n-queries", type=int, default=8)
    p.add_argument("--heldout", type=int, default=32, help="code: held-out prompts of the removal runs")
    p.add_argument("--max-new-tokens", type=int, default=96, help="projection-diff's sampled responses")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fractions", default="0.1,0.05")
    p.add_argument("--removal-methods", default="vector-filter,concept-influence,influence")
    p.add_argument("--random-repeats", type=int, default=3)
    p.add_argument("--full-baseline", action="store_true")
    p.add_argument("--removal-new-tokens", type=int, default=128)
    p.add_argument("--removal-generation", choices=["greedy", "sample"], default="greedy",
                   help="how each retrained model answers the held-out prompts (sample: phase removal_sampled, "
                        "with a full-data run to show whether the behaviour was learned)")
    p.add_argument("--removal-samples", type=int, default=4, help="sampled answers per held-out prompt")
    p.add_argument("--removal-temperature", type=float, default=1.0)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m-instruct")
    args = p.parse_args(argv)

    from mechsieve.models.loading import load_model

    results = Results("attribution", "B2 attribution (rebuilt: chmod code task, probe gate, removal)",
                      model=f"{args.model} (float32, CPU)", argv=argv)
    if results.get("settings", {}).get("n") not in (None, args.n) or "length_baseline" in results.data:
        for name in ("tasks", "removal", "length_baseline", "targets"):  # another pool: nothing carries over
            results.drop(name)
    results.set("settings", vars(args))
    if args.phase != "summarize":
        loaded = load_model(args.model)
        if args.phase in ("methods", "all"):
            run_methods(args, loaded, results)
        if args.phase in ("removal", "all"):
            run_removal(args, loaded, results)
    summarize(results)
    results.save()
    print(f"B2 attribution -> {results.path}: targets {results.targets()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
