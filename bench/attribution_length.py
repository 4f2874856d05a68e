"""B2 confound check: how well does response length alone find the planted examples?

Rebuilds the B2 pools exactly as bench/attribution.py does (its task builders, imported, same
settings as recorded in bench/results/attribution.json) and scores each example by its number of
response tokens; AUC-PR and precision@40 go into that JSON under tasks[task]["length_baseline"].
A method whose AUC-PR is close to this may be ranking by length (summed losses grow with it).

Run: python bench/attribution_length.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from _common import command_line

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "attribution.json"


def main() -> int:
    from mechsieve.data.render import RenderConfig, render_example
    from mechsieve.evaluate.attribution import attribution_metrics
    from mechsieve.models.loading import load_model

    spec = importlib.util.spec_from_file_location("attribution", ROOT / "bench" / "attribution.py")
    b2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b2)
    result = json.loads(OUT.read_text())
    s = result["settings"]
    tok = load_model(s["model"]).tokenizer
    render_cfg = RenderConfig(max_len=s["max_len"])
    for task, entry in result["tasks"].items():
        if task == "gsm8k":
            examples, labels, _, _ = b2.gsm8k_task(tok, s["n"], s["share"], 100, s["max_len"], s["seed"])
        else:
            examples, labels, _, _ = b2.code_task(tok, s["n"], s["share"], s["max_len"], s["seed"])
        lengths = np.array([int(render_example(ex, tok, render_cfg).response_mask.sum())
                            for ex in examples], dtype=np.float64)
        m = attribution_metrics(lengths, labels)
        entry["length_baseline"] = {"auc_pr": m["auc_pr"], "precision@40": m["precision@40"],
                                    "mean_response_tokens": {"planted": float(lengths[labels].mean()),
                                                             "other": float(lengths[~labels].mean())},
                                    "command": command_line(__file__)}
        print(f"[{task}] response length alone: AUC-PR {m['auc_pr']:.3f} P@40 {m['precision@40']:.3f}; "
              f"mean response tokens planted {lengths[labels].mean():.1f} vs other {lengths[~labels].mean():.1f}")
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
