"""B2 confound check: how well does response length alone find the planted examples?

Rebuilds the B2 pools exactly as bench/attribution.py does (the harness's builders, with the
settings recorded in bench/results/attribution.json) and scores each example by its number of
response tokens; AUC-PR and precision@40 per task go into that JSON under `length_baseline`.
A method whose AUC-PR is close to this may be ranking by length (summed losses grow with it).

Run: python bench/attribution_length.py
"""

from __future__ import annotations

import argparse

import numpy as np

from harness import Results
from harness.pools import b2_task


def main() -> int:
    from mechsieve.data.render import RenderConfig, render_example
    from mechsieve.evaluate.attribution import attribution_metrics
    from mechsieve.models.loading import load_model

    results = Results("attribution", "B2 attribution", runner="")
    if "tasks" not in results.data:
        raise SystemExit(f"{results.path} has no B2 tasks; run bench/attribution.py first")
    args = argparse.Namespace(**results["settings"])
    tok = load_model(args.model).tokenizer
    render_cfg = RenderConfig(max_len=args.max_len)
    out = results.phase("length_baseline")
    for task in results["tasks"]:
        examples, labels, _, _ = b2_task(task, tok, args.n, args.share, args.max_len, args.seed)
        lengths = np.array([int(render_example(ex, tok, render_cfg).response_mask.sum())
                            for ex in examples], dtype=np.float64)
        m = attribution_metrics(lengths, labels)
        out[task] = {"auc_pr": m["auc_pr"], "precision@40": m.get("precision@40"),
                     "mean_response_tokens": {"planted": float(lengths[labels].mean()),
                                              "other": float(lengths[~labels].mean())}}
        print(f"[{task}] response length alone: AUC-PR {m['auc_pr']:.3f} P@40 {m.get('precision@40')}; "
              f"mean response tokens planted {lengths[labels].mean():.1f} vs other {lengths[~labels].mean():.1f}")
    results.save(finished="length_baseline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
