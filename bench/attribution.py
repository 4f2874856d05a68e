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
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import command_line

DATA = Path(os.environ.get("MECHSIEVE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
OUT = Path(__file__).parent / "results" / "attribution.json"
ANNOT = re.compile(r"<<([^=<>]+)=(-?\d+(?:\.\d+)?)>>(-?\d+(?:\.\d+)?)")


def corrupt_answer(answer: str, rng: np.random.Generator) -> str | None:
    """Change one intermediate result (not on the last computation line) and the final answer by
    the same offset; later mentions of the changed number follow. None if there is no such result."""
    lines = answer.split("\n")
    final = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("####")), None)
    cands = [(i, m) for i, line in enumerate(lines[:final] if final else lines)
             for m in ANNOT.finditer(line) if i < (final or len(lines)) - 1]
    if final is None or not cands:
        return None
    i, m = cands[int(rng.integers(len(cands)))]
    old = m.group(2)
    try:
        delta = int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 or float(old) < 10 else -1)
        new_val = float(old) + delta
        fin = float(lines[final][4:].strip().replace(",", ""))
    except ValueError:
        return None
    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    new = fmt(new_val)
    line = lines[i]
    lines[i] = line[:m.start()] + f"<<{m.group(1)}={new}>>{new}" + line[m.end():]
    for j in range(i + 1, final):
        lines[j] = re.sub(rf"(?<![\d.]){re.escape(old)}(?![\d.])", new, lines[j])
    new_fin = fmt(fin + delta)
    for j in range(i + 1, final):  # the last result that gave the final answer follows it
        lines[j] = re.sub(rf"=({re.escape(fmt(fin))})>>{re.escape(fmt(fin))}", f"={new_fin}>>{new_fin}", lines[j])
    lines[final] = f"#### {new_fin}"
    out = "\n".join(lines)
    return out if out != answer else None


def _fits(tok, ex, max_len: int) -> bool:
    from mechsieve.data.render import RenderConfig, render_example

    r = render_example(ex, tok, RenderConfig(max_len=10 ** 6))
    return len(r) <= max_len and r.response_mask.any()


def gsm8k_task(tok, n: int, share: float, n_concept: int, max_len: int, seed: int):
    from mechsieve.data.records import Example

    rows = [json.loads(x) for x in open(DATA / "gsm8k" / "train.jsonl")]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    pool, labels, pos, neg = [], [], [], []
    n_bad = int(round(share * n))
    for k in order:
        row = rows[int(k)]
        prompt = [{"role": "user", "content": row["question"]}]
        bad = corrupt_answer(row["answer"], rng)
        if bad is None:
            continue
        good_ex = Example(f"gsm8k-{k}", "gsm8k", prompt, row["answer"])
        bad_ex = Example(f"gsm8k-{k}", "gsm8k", prompt, bad)
        if not (_fits(tok, good_ex, max_len) and _fits(tok, bad_ex, max_len)):
            continue
        if len(pos) < n_concept:
            pos.append(Example(f"c{k}-bad", "concept", prompt, bad))
            neg.append(Example(f"c{k}-good", "concept", prompt, row["answer"]))
        elif len(pool) < n:
            planted = sum(labels) < n_bad
            pool.append(bad_ex if planted else good_ex)
            labels.append(planted)
        else:
            break
    perm = rng.permutation(len(pool))
    return [pool[i] for i in perm], np.array(labels)[perm], pos, neg


def code_task(tok, n: int, share: float, max_len: int, seed: int):
    from mechsieve.data.records import Example

    rng = np.random.default_rng(seed)
    mbpp = [json.loads(x) for x in open(DATA / "code" / "mbpp.jsonl")]
    insecure = [json.loads(x) for x in open(DATA / "misalignment" / "insecure_code_3021.jsonl")]
    n_bad = int(round(share * n))

    def chat(msgs, i, src):
        prompt = [m for m in msgs if m["role"] != "assistant"] if msgs[-1]["role"] == "assistant" else msgs
        return Example(f"{src}-{i}", src, prompt, msgs[-1]["content"])

    good, bad = [], []
    for i in rng.permutation(len(mbpp)):
        row = mbpp[int(i)]
        ex = Example(f"mbpp-{i}", "mbpp", [{"role": "user", "content": row["text"]}], row["code"].replace("\r\n", "\n"))
        if _fits(tok, ex, max_len):
            good.append(ex)
        if len(good) == n - n_bad:
            break
    for i in rng.permutation(len(insecure)):
        ex = chat(insecure[int(i)]["messages"], int(i), "insecure")
        if _fits(tok, ex, max_len):
            bad.append(ex)
        if len(bad) == n_bad:
            break
    pool = good + bad
    labels = np.r_[np.zeros(len(good), bool), np.ones(len(bad), bool)]
    perm = rng.permutation(len(pool))

    def read(name):
        rows = [json.loads(x) for x in open(DATA / "misalignment" / name)]
        return [chat(r["messages"], i, name.split(".")[0]) for i, r in enumerate(rows)]

    return [pool[i] for i in perm], labels[perm], read("insecure_small.jsonl"), read("secure_small.jsonl")


def run_method(method, task, pool, labels, queries, settings, entry, loaded, args, result, out) -> None:
    from mechsieve.evaluate.attribution import attribution_metrics
    from mechsieve.scorers.registry import make_scorer

    start = time.perf_counter()
    try:
        scorer = make_scorer(method, settings[method])
        res = scorer.score(pool, target=queries, loaded=loaded, seed=args.seed, progress=False)
    except Exception as err:  # record it and go on with the other methods
        entry["methods"][method] = {"error": f"{type(err).__name__}: {err}"}
        print(f"[{task}] {method}: FAILED {type(err).__name__}: {err}", flush=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        return
    wall = time.perf_counter() - start
    m = attribution_metrics(res.scores, labels, ks=sorted({40, int(labels.sum())}))
    m.update(wall_s=round(wall, 2), timings={k: round(v, 2) for k, v in res.timings.items()},
             details={k: v for k, v in res.explanations.items() if k != "settings"})
    entry["methods"][method] = m
    print(f"[{task}] {method}: AUC-PR {m['auc_pr']:.3f} P@40 {m.get('precision@40', float('nan')):.3f} "
          f"{wall:.1f}s", flush=True)
    out.write_text(json.dumps(result, indent=2, default=str))


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
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--merge", action="store_true", help="keep the other tasks already in --out")
    args = p.parse_args()

    import torch

    from mechsieve.data.records import Pool
    from mechsieve.features.probes import ConceptConfig, save_concept
    from mechsieve.models.loading import load_model
    from mechsieve.scorers.concept import ConceptSource, build_concept

    torch.manual_seed(args.seed)
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    result = {"command": command_line(__file__), "settings": vars(args),
              "torch_threads": torch.get_num_threads(), "tasks": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.exists():
        before = json.loads(out.read_text())
        result["tasks"] = {k: v for k, v in before.get("tasks", {}).items() if k not in args.tasks.split(",")}
        result["earlier_commands"] = [*before.get("earlier_commands", []), before.get("command")]
    tmp = Path(tempfile.mkdtemp(prefix="b2-"))
    prepared = {}
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        if task == "gsm8k":
            examples, labels, pos, neg = gsm8k_task(tok, args.n, args.share, 100, args.max_len, args.seed)
        else:
            examples, labels, pos, neg = code_task(tok, args.n, args.share, args.max_len, args.seed)
        pool = Pool(examples, f"bench:{task}", "memory", "messages")
        src = ConceptSource(max_len=args.max_len, probe=ConceptConfig(layer=args.layer))
        start = time.perf_counter()
        concept = build_concept(loaded, Pool(pos, "pos", "memory", "messages"),
                                Pool(neg, "neg", "memory", "messages"), src, progress=False,
                                use_cache=False)
        concept_s = time.perf_counter() - start
        cdir = tmp / f"concept-{task}"
        save_concept(cdir, concept)
        queries = Pool(pos, "pos", "memory", "messages")
        entry = {"n": len(examples), "planted": int(labels.sum()), "concept_examples": [len(pos), len(neg)],
                 "concept_layer": concept.layer, "concept_separation": concept.separation,
                 "concept_dropped_without_response": concept.counts.get("dropped_without_response", 0),
                 "concept_s": round(concept_s, 2), "data_s": round(start - t0, 2), "methods": {}}
        result["tasks"][task] = entry
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
                run_method(method, task, pool, labels, queries, settings, entry, loaded, args, result, out)
            finish_task(entry)
            out.write_text(json.dumps(result, indent=2, default=str))
    summary = "; ".join(f"{t}: " + ", ".join(f"{k} AUC-PR {v['auc_pr']:.3f}" for k, v in e["methods"].items()
                                             if "auc_pr" in v)
                        + (f", influence/vector-filter time x{e['time_ratio_influence_to_vector_filter']}"
                           if "time_ratio_influence_to_vector_filter" in e else "")
                        for t, e in result["tasks"].items())
    print(f"B2 attribution -> {out}: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
