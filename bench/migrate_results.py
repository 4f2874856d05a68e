"""Move the results written before the harness (bench/harness/) into its fixed layout, once.

No figure is recomputed from a model: the commands, machines and figures of the earlier runs are
moved under the keys the scripts now write (`provenance` per phase, each script's phase keys),
absolute paths are made portable, and the spreads over seeds are recomputed from the per-seed
values the files hold, as sample std (ddof=1; the scripts used ddof=0 before). A file already in
the new layout (it has `provenance`) is left alone, so a second run changes nothing.

    python bench/migrate_results.py
"""

from __future__ import annotations

import json
import subprocess

from harness import RESULTS, ROOT, Results, spread


def landed_in(path) -> str | None:
    out = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%H", "--", str(path)],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


def entry(command: str, machine=None, landed: str | None = None) -> dict:
    return {"command": command, "commit": None, "landed_in": landed, "finished": True,
            "machine": machine, "note": "run before the bench harness; commit not recorded"}


def move(d: dict, keys, into: dict) -> None:
    for k in keys:
        if k in d:
            into[k] = d.pop(k)


def targeted_selection(d: dict, landed: str) -> None:
    m = d.pop("machine", None)
    first = d.pop("command")  # --phase all: select and train
    sel, tr = d["select"], d["train"]
    prov = {"select": [entry(first, m, landed) | {"wall_s": sel.pop("total_s", None)}],
            "train": [entry(first, m, landed) | {"wall_s": tr.pop("total_s", None)}]}
    if "command_rescore-ifd" in d:
        prov["select"].append(entry(d.pop("command_rescore-ifd"), m, landed))
    merged = d.pop("merged_commands", [])  # the LESS runs (--methods less); the last wrote total_s_less
    for k, cmd in enumerate(merged):
        last = k == len(merged) - 1
        prov["select"].append(entry(cmd, m, landed) | {"wall_s": sel.pop("total_s_less", None) if last else None})
        if "--phase" not in cmd:  # select and train
            prov["train"].append(entry(cmd, m, landed) | {"wall_s": tr.pop("total_s_less", None)})
    d["provenance"] = prov
    tr.pop("random_mean", None)
    tr.pop("random_std", None)
    tr["random"] = spread(tr["heldout_loss"][f"random_seed{s}"] for s in range(3))


def igds(d: dict, landed: str) -> None:
    m = d.pop("machine", None)
    d["provenance"] = {k: [entry(v, m, landed)] for k, v in d.pop("commands").items()}
    b = d["b1b"]
    b.pop("random_mean_loss", None)
    b.pop("random_std_loss", None)
    b["random_loss"] = spread(b["runs"][f"random_seed{s}"]["heldout_loss"] for s in range(3))
    for phase in ("sae", "b1", "b1b"):
        if "total_s" in d.get(phase, {}):
            d["provenance"][phase][0]["wall_s"] = d[phase].pop("total_s")


def token_noise(d: dict, landed: str) -> None:
    m = d.pop("machine", None)
    cmds = d.pop("commands")
    d["provenance"] = {k: [entry(c, m, landed) for c in cmds] for k in ("scoring", "detection", "fine_tune")}
    d["scoring"] = {"data": d.pop("data"), "seconds": d.pop("scoring_seconds"), "info": d.pop("scoring_info")}
    ft = d["fine_tune"]
    by: dict[str, list[float]] = {}
    for r in ft["runs"]:
        by.setdefault(r["variant"], []).append(r["heldout"]["loss_per_token"])
    ft.pop("mean_loss_per_token", None)
    ft["loss_per_token"] = {k: spread(v) for k, v in by.items()}


def attribution(d: dict, landed: str) -> None:
    m = {"torch_threads": d.pop("torch_threads", None)}
    d["benchmark"] = "B2 attribution"
    d["model"] = f"{d['settings']['model']} (float32, CPU)"
    d["settings"].pop("out", None)
    d["provenance"] = {"tasks": [entry(d.pop("command"), m, landed)], "length_baseline": []}
    lengths = {}
    for task, e in d["tasks"].items():
        if "length_baseline" in e:
            lb = e.pop("length_baseline")
            cmd = lb.pop("command", "python bench/attribution_length.py")
            lengths[task] = lb
    if lengths:
        d["length_baseline"] = lengths
        d["provenance"]["length_baseline"] = [entry(cmd, m, landed)]


def single_phase(phase: str, keep=("benchmark", "model")):
    def run(d: dict, landed: str) -> None:
        m, cmd = d.pop("machine", None), d.pop("command")
        body = {k: d.pop(k) for k in list(d) if k not in keep}
        d[phase] = body
        d["provenance"] = {phase: [entry(cmd, m, landed)]}
    return run


def capture_throughput(d: dict, landed: str) -> None:
    m, cmd = d.pop("machine", None), d.pop("command")
    d["memory"] = {"runs": d.pop("memory"), "growth": d.pop("memory_growth")}
    d["provenance"] = {"throughput": [entry(cmd, m, landed)], "memory": [entry(cmd, m, landed)]}


def less_grads(d: dict, landed: str) -> None:
    m, cmd = d.pop("machine", None), d.pop("command")
    d["grads"] = {k: d.pop(k) for k in ("settings", "seconds", "examples_per_s", "speedup", "agreement")}
    d["provenance"] = {"grads": [entry(cmd, m, landed)], "less_features": [entry(cmd, m, landed)]}


def throughput(d: dict, landed: str) -> None:
    m, cmd = d.pop("machine", None), d.pop("command")
    d["provenance"] = {"cpu": [entry(cmd, m, landed)], "gpu": [entry(cmd, m, landed)]}


MIGRATIONS = {"targeted_selection": targeted_selection, "igds": igds, "token_noise": token_noise,
              "attribution": attribution, "train_smoke": single_phase("smoke"),
              "capture_throughput": capture_throughput, "less_grads": less_grads, "throughput": throughput}


def main() -> int:
    for name, migrate in MIGRATIONS.items():
        path = RESULTS / f"{name}.json"
        d = json.loads(path.read_text())
        if "provenance" in d:
            print(f"{path.name}: already in the harness layout")
            continue
        migrate(d, landed_in(path))
        order = ["benchmark", "model", "provenance"]
        res = Results(name, d["benchmark"], runner="")
        res.data = {**{k: d[k] for k in order if k in d}, **{k: v for k, v in d.items() if k not in order}}
        res.save()
        print(f"{path.name}: moved to the harness layout")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
