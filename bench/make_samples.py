"""Write the demo's bundled chmod attribution samples (src/mechsieve/data/samples/chmod_*.jsonl).

`harness.pools.chmod_code` at demo size: insecure_code_3021 chats (emergent-misalignment, MIT)
whose answer sets a file mode to 0o777. `chmod_pool.jsonl`: `--n` chats, a seeded `--share` with
the answer as it is (`planted: true`), the rest with the mode patched to 0o700; the concept files
`chmod_insecure.jsonl` / `chmod_secure.jsonl`: `--n-concept` other prompts with both answers.
Every record renders within 256 SmolLM2 tokens.

    python bench/make_samples.py            # rewrites the three files, same bytes for the same flags
"""

from __future__ import annotations

import argparse
import json

from harness.pools import chmod_code
from mechsieve.data.writers import example_to_messages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--share", type=float, default=0.2)
    p.add_argument("--n-concept", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from importlib import resources

    from mechsieve.models.loading import load_tokenizer

    task = chmod_code(load_tokenizer("smollm2-135m-instruct"), args.n, args.share, args.n_concept, 0, 0, 256,
                      args.seed)
    folder = resources.files("mechsieve.data") / "samples"
    files = {"chmod_pool.jsonl": [{**example_to_messages(ex), "planted": bool(p)} for ex, p in zip(task.pool, task.labels)],
             "chmod_insecure.jsonl": [example_to_messages(ex) for ex in task.concept_pos],
             "chmod_secure.jsonl": [example_to_messages(ex) for ex in task.concept_neg]}
    for name, rows in files.items():
        with open(str(folder / name), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"wrote {folder / name}: {len(rows)} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
