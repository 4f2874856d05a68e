"""Faults: kill -9 at seeded points of every long command, a table of bad inputs, foreign files.

Kills. Each long command (`capture`, sharded `select`, `mask-tokens`, `sae train`, `train`) runs
once uninterrupted as the reference, then again in a fresh folder as a subprocess that gets
SIGKILL at a seeded point (after its m-th chunk or shard file appeared, m drawn from `--seed`;
for commands without chunks, a seeded share of its working time after it claimed its output
folder), and is then rerun with the same command line. A kill counts as survived when
- no file under its final name was torn (every visible JSON, safetensors, Parquet and Arrow file
  left by the killed run opens and parses),
- the rerun exits 0 and its data outputs are byte-identical to the reference's,
- what the killed run had finished (capture chunks, engine shards) is not computed again: the
  rerun reports exactly that many as resumed.
Pools are short synthetic arithmetic examples; the model is a tiny random Llama (d=64) with
SmolLM2's tokenizer, or SmolLM2 itself with `--smollm2` (capture of block 0 only).

Bad inputs. Every reader format (JSONL, JSON array, CSV, Parquet, a `save_to_disk` folder) x
{truncated record, wrong type, empty response, non-UTF-8 bytes, BOM, empty file, one enormous
line, duplicate ids, mixed layouts}, read by `mechsieve select --method random`: each must end
clearly, i.e. either exit 2 with one line naming the file (and, for line formats, the line) and
nothing written, or be accepted as documented (a BOM, duplicate ids made unique, a long line);
with `--skip-invalid`, a bad record is skipped and counted instead. A traceback is never clear.

    flock /tmp/mechsieve-bench.lock python bench/faults.py            # bench/results/faults.json
    python bench/faults.py --examples 3000 --kills 3 --smollm2 --smollm2-examples 10000
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# --- inputs ----------------------------------------------------------------------------------------

def tiny_model(folder: Path, tokenizer_from: str = "smollm2-135m-instruct", seed: int = 0) -> Path:
    """A random 4-block Llama (d=64) saved with `tokenizer_from`'s tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mechsieve.models import load_tokenizer

    tok = load_tokenizer(tokenizer_from)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def short_pool(path: Path, n: int, seed: int = 0) -> Path:
    """`n` short seeded question/answer records (GSM8K layout) as JSONL."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            a, b = (int(x) for x in rng.integers(1, 100, size=2))
            words = " ".join(["then"] * int(rng.integers(0, 6)))
            fh.write(json.dumps({"id": f"q{i}", "question": f"What is {a} plus {b}? {words}".strip(),
                                 "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}) + "\n")
    return path


# --- kills -----------------------------------------------------------------------------------------

@dataclass
class Command:
    """A long command under test: its arguments, its data outputs, and how it counts resumed work."""

    name: str
    argv: Callable[[str, str, str], list[str]]
    """(model, pool, out) -> CLI arguments."""
    outputs: tuple[str, ...]
    """Globs (under OUT) of the data files that must be byte-identical to the reference."""
    finished: Callable[[Path], int] | None = None
    """Units a killed run left finished (chunks, shards), counted in its folder."""
    resumed: re.Pattern | None = None
    """What the rerun prints about resumed units (group 1: the count, in the units `finished` counts)."""
    done: Callable[[Path], int] | None = None
    """Finished units (chunk or shard files) present in OUT while it runs; default `finished`."""
    per_unit: int = 0
    """Examples per chunk or shard (0: the command leaves no finished units)."""

    def units_done(self, out: Path) -> int:
        return (self.done or self.finished)(out)


def _count(pattern: str) -> Callable[[Path], int]:
    return lambda out: len(list(out.glob(pattern)))


def _chunk_examples(out: Path) -> int:
    """Examples held by the finished capture chunks in OUT (their `indices` rows)."""
    from safetensors import safe_open

    total = 0
    for path in out.glob("chunks/*.safetensors"):
        with safe_open(str(path), "np") as fh:
            total += len(fh.get_tensor("indices"))
    return total


def capture_command(name: str, chunk: int, layers: str, reductions: str, max_tokens: int | None = None) -> Command:
    """`capture` of `layers` with `reductions`, resumable in chunks of `chunk` examples."""
    batch = ["--max-tokens", str(max_tokens)] if max_tokens else []
    return Command(
        name, lambda m, p, o: ["capture", "--model", m, "--pool", p, "--layers", layers, "--reductions", reductions,
                               "--out", o, "--set", f"capture.chunk_examples={chunk}", *batch, "--quiet"],
        ("activations.safetensors",), _chunk_examples, re.compile(r"(\d+) examples resumed from chunks"),
        _count("chunks/*.safetensors"), per_unit=chunk)


def commands(chunk: int, shard: int) -> dict[str, Command]:
    q = ["--quiet"]
    return {
        "capture": capture_command("capture", chunk, "0,-1", "mean_response,last", max_tokens=2048),
        "select-sharded": Command(
            "select-sharded", lambda m, p, o: ["select", "--method", "loss", "--model", m, "--pool", p, "--budget",
                                               "0.5", "--engine", "local", "--shard-size", str(shard), "--out", o, *q],
            ("scores.parquet", "selected*"), _count("shards/*.done"), re.compile(r"\((\d+) resumed"),
            per_unit=shard),
        "mask-tokens": Command(
            "mask-tokens", lambda m, p, o: ["mask-tokens", "--model", m, "--pool", p, "--domain", "math", "--engine",
                                            "local", "--shard-size", str(shard), "--out", o, *q],
            ("**/*.arrow",), _count("shards/*.done"), re.compile(r"\((\d+) resumed"), per_unit=shard),
        "sae-train": Command(
            "sae-train", lambda m, p, o: ["sae", "train", "--model", m, "--pool", p, "--layer", "1", "--d-sae", "128",
                                          "--k", "8", "--epochs", "2", "--out", o, *q],
            ("*.safetensors",)),
        "train": Command(
            "train", lambda m, p, o: ["train", "--model", m, "--data", p, "--steps", "40", "--max-tokens", "512",
                                      "--out", o, *q],
            ("**/*.safetensors",)),
    }


def torn_files(out: Path) -> list[str]:
    """Visible files (no dot in any part of the name below OUT) that do not open as what they say."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors import safe_open

    bad = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".jsonl":
                for line in path.read_text(encoding="utf-8").splitlines():
                    json.loads(line)
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "np") as fh:
                    [fh.get_tensor(k) for k in fh.keys()]
            elif path.suffix == ".parquet":
                pq.read_table(path)
            elif path.suffix == ".arrow":
                with pa.memory_map(str(path)) as src:
                    pa.ipc.open_stream(src).read_all()
        except Exception as err:  # noqa: BLE001 - any failure to open is a torn file
            bad.append(f"{rel}: {type(err).__name__}")
    return bad


def _marker_complete(out: Path) -> bool:
    try:
        return bool(json.loads((out / ".mechsieve.json").read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError):
        return False


def data_files(out: Path, globs: tuple[str, ...]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for g in globs:
        for path in out.glob(g):
            rel = path.relative_to(out)
            if path.is_file() and not any(p.startswith(".") for p in rel.parts) and "shards" not in rel.parts:
                files[str(rel)] = path.read_bytes()
    return files


def run_watched(argv: list[str], out: Path, env: dict[str, str], timeout: float) -> tuple[int, str, float, float]:
    """Run the CLI and note when its output folder's marker appeared (the command's work starts
    there: it claims the folder just before its first write). Returns (rc, log, wall, t_marker)."""
    t0 = time.perf_counter()
    marked = None
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mechsieve", *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        while proc.poll() is None and time.perf_counter() - t0 < timeout:
            if marked is None and (out / ".mechsieve.json").exists():
                marked = time.perf_counter() - t0
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        log.seek(0)
        text = log.read()
    return rc, text, wall, marked if marked is not None else wall


def kill_trials(cmd: Command, model: str, pool: str, work: Path, kills: int, rng: np.random.Generator,
                env: dict[str, str], timeout: float) -> dict:
    """The reference run, then `kills` seeded kill-and-rerun trials of one command.

    Where the command leaves finished units (chunks or shards of `cmd.per_unit` examples), a trial kills it a
    seeded moment (0-0.3 s) after its m-th unit appeared, m seeded; otherwise a seeded share
    (5-95%) of the reference's working time after its output folder was claimed."""
    ref_out = work / f"{cmd.name}-reference"
    rc, log, wall, marked = run_watched(cmd.argv(model, pool, str(ref_out)), ref_out, env, timeout)
    if rc != 0:
        return {"reference_failed": log[-2000:], "trials": []}
    reference = data_files(ref_out, cmd.outputs)
    with open(pool, encoding="utf-8") as fh:
        examples = sum(1 for line in fh if line.strip())
    units = -(-examples // cmd.per_unit) if cmd.per_unit else 0
    working = max(wall - marked, 0.1)
    out: dict = {"reference_s": round(wall, 1), "work_starts_s": round(marked, 1), "units": units,
                 "reference_files": sorted(reference), "trials": []}
    for k in range(kills):
        folder = work / f"{cmd.name}-kill{k}"
        trial: dict = {}
        if units > 1:
            trial["after_unit"] = int(rng.integers(0, units - 1))
            trial["jitter_s"] = round(float(rng.uniform(0.0, 0.3)), 2)
        else:
            trial["after_work_started_s"] = round(float(rng.uniform(0.05, 0.95)) * working, 2)
        proc = subprocess.Popen([sys.executable, "-m", "mechsieve", *cmd.argv(model, pool, str(folder))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        t0 = time.perf_counter()
        while proc.poll() is None and time.perf_counter() - t0 < timeout:
            if "after_unit" in trial:
                if folder.exists() and cmd.units_done(folder) > trial["after_unit"]:
                    time.sleep(trial["jitter_s"])
                    break
            elif (folder / ".mechsieve.json").exists():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=trial["after_work_started_s"])
                break
            time.sleep(0.02)
        trial["landed"] = proc.poll() is None  # False: it finished before the kill
        trial["killed_at_s"] = round(time.perf_counter() - t0, 2)
        if trial["landed"]:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        trial["torn_files"] = torn_files(folder) if folder.exists() else []
        finished = cmd.finished(folder) if cmd.finished and folder.exists() else None
        rc, log, wall_rerun, _ = run_watched(cmd.argv(model, pool, str(folder)), folder, env, timeout)
        trial.update(rerun_rc=rc, rerun_s=round(wall_rerun, 1), finished_before_rerun=finished)
        if rc == 2 and "already holds the output of an earlier" in log and _marker_complete(folder):
            # the kill landed after the run had finished its work: its outputs are the result
            trial["finished_before_kill"] = True
            rc = 0
        trial["rerun_ok"] = rc == 0
        if rc != 0:
            trial["rerun_error"] = log[-1500:]
        got = data_files(folder, cmd.outputs) if rc == 0 else {}
        trial["identical"] = rc == 0 and got == reference
        if rc == 0 and got != reference:
            trial["differing"] = sorted(set(got) ^ set(reference) | {f for f in got if got.get(f) != reference.get(f)})
        resumed_ok = True
        if cmd.resumed is not None and finished is not None and rc == 0:
            m = cmd.resumed.search(log)
            trial["resumed_reported"] = int(m.group(1)) if m else 0
            resumed_ok = trial["resumed_reported"] == finished  # not one finished unit computed again
        trial["resumed_ok"] = resumed_ok
        trial["survived"] = not trial["torn_files"] and trial["identical"] and resumed_ok
        out["trials"].append(trial)
        print(f"  [{cmd.name}] kill {k} at {trial['killed_at_s']:.1f} s ({'landed' if trial['landed'] else 'too late'}): "
              f"finished {finished}, rerun rc {rc}, identical {trial['identical']}, "
              f"torn {len(trial['torn_files'])}, survived {trial['survived']}", flush=True)
    return out


# --- bad inputs ------------------------------------------------------------------------------------

CASES = ("truncated_record", "wrong_type", "empty_response", "non_utf8", "bom", "empty_file", "enormous_line",
         "duplicate_ids", "mixed_layouts")
FORMATS = ("jsonl", "json", "csv", "parquet", "datasets")
# Cases a reader accepts by design (README "Data"): a BOM is read past, repeated ids get ~2, ~3.
ACCEPTED = {"bom", "duplicate_ids", "enormous_line"}
RECORD_LEVEL = {"truncated_record", "wrong_type", "empty_response", "non_utf8", "mixed_layouts"}


def _good(i: int) -> dict:
    return {"id": f"r{i}", "question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}


def _records(case: str) -> list[dict]:
    rows = [_good(i) for i in range(6)]
    if case == "wrong_type":
        rows[3]["answer"] = ["not", "a", "string"]
    elif case == "empty_response":
        rows[3]["answer"] = ""
    elif case == "enormous_line":
        rows[3]["answer"] = "7 " * 1_000_000 + "\n#### 7"
    elif case == "duplicate_ids":
        rows[4]["id"] = rows[2]["id"]
    elif case == "mixed_layouts":
        rows[3] = {"instruction": "Say hi.", "input": "", "output": "hi"}
    return rows


def write_bad(folder: Path, fmt: str, case: str) -> Path | None:
    """The input file of one (format, case), or None where the case cannot exist in the format."""
    rows = _records(case)
    name = folder / f"{case}.{'json' if fmt == 'json' else fmt}"
    if fmt in ("jsonl", "json", "csv"):
        if fmt == "jsonl":
            lines = [json.dumps(r) for r in rows]
            text = "\n".join(lines) + "\n"
        elif fmt == "json":
            text = "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"
        else:
            if case == "wrong_type":
                return None  # every CSV value is a string
            import csv

            buf = io.StringIO()  # one line per record: answers without newlines
            rows = [{k: v.replace("\n", " ") if isinstance(v, str) else v for k, v in r.items()} for r in rows]
            writer = csv.DictWriter(buf, fieldnames=["id", *sorted({k for r in rows for k in r} - {"id"})],
                                    lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            text = buf.getvalue()
        data = text.encode("utf-8")
        if case == "truncated_record":  # record 4 cut short: mid-string (JSON), missing fields (CSV)
            lines = data.split(b"\n")
            at = 4 if fmt == "csv" else 3 if fmt == "jsonl" else 4
            lines[at] = lines[at][: len(lines[at]) // 2] if fmt != "csv" else lines[at].rsplit(b",", 1)[0]
            if fmt == "json":  # a truncated file: the array ends mid-record
                lines = lines[: at + 1]
            data = b"\n".join(lines)
        elif case == "non_utf8":
            at = data.find(b"plus", len(data) // 2)
            data = data[:at] + b"\xff\xfe" + data[at + 4:]
        elif case == "bom":
            data = b"\xef\xbb\xbf" + data
        elif case == "empty_file":
            data = b""
        name.write_bytes(data)
        return name
    if case in ("non_utf8", "bom"):
        return None  # Arrow strings are UTF-8 by construction; a BOM is a text-file matter
    import pyarrow as pa
    import pyarrow.parquet as pq

    if case == "empty_file":
        table = pa.table({"id": pa.array([], pa.string()), "question": pa.array([], pa.string()),
                          "answer": pa.array([], pa.string())})
    elif case == "wrong_type":
        table = pa.table({"id": [r["id"] for r in rows], "question": [r["question"] for r in rows],
                          "answer": [[len(str(r["answer"]))] for r in rows]})
    elif case == "mixed_layouts":
        table = pa.Table.from_pylist([{**_good(i), "instruction": None, "output": None} for i in range(3)]
                                     + [{"id": None, "question": None, "answer": None, "instruction": "Say hi.",
                                         "output": "hi"}])
    else:
        table = pa.Table.from_pylist(rows)
    if fmt == "parquet":
        pq.write_table(table, name)
        if case == "truncated_record":
            name.write_bytes(name.read_bytes()[: name.stat().st_size // 2])
        return name
    from datasets import Dataset

    Dataset(table).save_to_disk(str(name))
    if case == "truncated_record":
        for arrow in name.glob("*.arrow"):
            arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    return name


def bad_input_row(path: Path, fmt: str, case: str, skip_invalid: bool, work: Path) -> dict:
    from mechsieve.cli import main

    out = work / f"out-{fmt}-{case}-{int(skip_invalid)}"
    argv = ["select", "--method", "random", "--budget", "2", "--pool", str(path), "--out", str(out), "--quiet"]
    if skip_invalid:
        argv.insert(-1, "--skip-invalid")
    err, std = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            rc = main(argv)
        crash = None
    except BaseException as exc:  # noqa: BLE001 - a traceback is what this table looks for
        rc, crash = 1, f"{type(exc).__name__}: {exc}"[:300]
    message = err.getvalue().strip()
    written = out.exists() and any(out.iterdir())
    line_format = fmt in ("jsonl", "json", "csv")
    names_place = path.name in message and (not line_format or re.search(re.escape(path.name) + r":\d+", message)
                                            or case == "empty_file")
    if crash is not None:
        clear = False
    elif rc == 2:
        clear = bool(names_place) and len(message.splitlines()) == 1 and not written
    elif rc == 0:
        skipped = re.search(r"skipped (\d+) invalid", std.getvalue())
        clear = case in ACCEPTED or (skip_invalid and case in RECORD_LEVEL and skipped is not None)
    else:
        clear = False
    return {"format": fmt, "case": case, "skip_invalid": skip_invalid, "rc": rc, "clear": clear,
            "message": message[:300] or None, "crash": crash, "written_on_error": written and rc != 0}


def bad_inputs(work: Path) -> list[dict]:
    rows = []
    for fmt in FORMATS:
        for case in CASES:
            folder = work / f"in-{fmt}"
            folder.mkdir(parents=True, exist_ok=True)
            path = write_bad(folder, fmt, case)
            if path is None:
                continue
            for skip in ((False, True) if case in RECORD_LEVEL else (False,)):
                rows.append(bad_input_row(path, fmt, case, skip, work))
    return rows


# --- foreign files ---------------------------------------------------------------------------------

def foreign_files(cmds: dict[str, Command], model: str, pool: str, work: Path, env: dict[str, str],
                  timeout: float) -> list[dict]:
    """Each long command pointed at a folder holding a user's files: they must all still be there."""
    rows = []
    for cmd in cmds.values():
        out = work / f"foreign-{cmd.name}"
        (out / "old_run").mkdir(parents=True)
        (out / "notes.txt").write_text("mine\n")
        (out / "old_run" / "x.json").write_text("{}\n")
        rc, log, _, _ = run_watched(cmd.argv(model, pool, str(out)), out, env, timeout)
        kept = (out / "notes.txt").is_file() and (out / "notes.txt").read_text() == "mine\n" \
            and (out / "old_run" / "x.json").is_file()
        rows.append({"command": cmd.name, "rc": rc, "kept": kept, "message": log.strip().splitlines()[-1][:300]
                     if log.strip() else None})
        print(f"  [foreign files] {cmd.name}: rc {rc}, user's files kept {kept}", flush=True)
    return rows


# --- the benchmark ---------------------------------------------------------------------------------

def kill_counts(trials: list[dict]) -> dict[str, int]:
    """Kills tried, landed (the run was still going), survived, identical, and with a torn file."""
    return {"tried": len(trials), "landed": sum(t["landed"] for t in trials),
            "survived": sum(t["survived"] for t in trials), "identical": sum(t["identical"] for t in trials),
            "torn": sum(bool(t["torn_files"]) for t in trials)}


@dataclass
class Plan:
    examples: int = 3000
    kills: int = 3
    seed: int = 0
    chunk: int = 256
    shard: int = 400
    timeout: float = 900.0
    only: list[str] = field(default_factory=list)


def run_faults(plan: Plan, work: Path, model: str | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MECHSIEVE_CACHE": str(work / "cache"),
           "TOKENIZERS_PARALLELISM": "false"}
    model = model or str(tiny_model(work / "tiny-model"))
    pool = str(short_pool(work / "pool.jsonl", plan.examples, plan.seed))
    rng = np.random.default_rng(plan.seed)
    cmds = {k: v for k, v in commands(plan.chunk, plan.shard).items() if not plan.only or k in plan.only}
    kills = {}
    for name, cmd in cmds.items():
        print(f"[kills] {name}", flush=True)
        kills[name] = kill_trials(cmd, model, pool, work, plan.kills, rng, env, plan.timeout)
    print("[bad inputs]", flush=True)
    bad = bad_inputs(work / "bad")
    print("[foreign files]", flush=True)
    foreign = foreign_files(cmds, model, pool, work, env, plan.timeout)
    return {
        "kills": {**kill_counts([t for k in kills.values() for t in k["trials"]]), "per_command": kills},
        "bad_inputs": {"tried": len(bad), "clear": sum(r["clear"] for r in bad),
                       "tracebacks": sum(r["crash"] is not None for r in bad),
                       "written_on_error": sum(r["written_on_error"] for r in bad), "rows": bad},
        "foreign_files": {"tried": len(foreign), "kept": sum(r["kept"] for r in foreign), "rows": foreign},
    }


def main() -> int:
    from harness import Results

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=3000, help="short examples in the kill pools (tiny model)")
    p.add_argument("--kills", type=int, default=3, help="kill points per command")
    p.add_argument("--only", default="", help="comma-separated commands (default: all)")
    p.add_argument("--smollm2", action="store_true", help="also kill capture of block 0 of SmolLM2")
    p.add_argument("--smollm2-examples", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    results = Results("faults", "faults: kill -9, bad inputs, foreign files")
    with tempfile.TemporaryDirectory(prefix="mechsieve-faults-") as tmp:
        work = Path(tmp)
        plan = Plan(examples=args.examples, kills=args.kills, seed=args.seed,
                    only=[x for x in args.only.split(",") if x])
        out = results.phase("tiny")
        out.update({"model": "random 4-block Llama, d=64, SmolLM2 tokenizer", "examples": args.examples},
                   **run_faults(plan, work / "tiny"))
        results.save(finished="tiny")
        if args.smollm2:
            big = Plan(examples=args.smollm2_examples, kills=args.kills, seed=args.seed + 1, chunk=1024,
                       only=["capture"])
            work_big = work / "smollm2"
            work_big.mkdir()
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            pool = str(short_pool(work_big / "pool.jsonl", big.examples, big.seed))
            cmd = capture_command("capture-smollm2", big.chunk, "0", "mean_response")
            print("[kills] capture on SmolLM2, block 0", flush=True)
            phase = results.phase("smollm2")  # its clock starts here, with the trials
            res = kill_trials(cmd, "smollm2-135m-instruct", pool, work_big, args.kills,
                              np.random.default_rng(big.seed), env, big.timeout)
            phase.update({"model": "smollm2-135m-instruct, capture of block 0", "examples": big.examples,
                          "kills": {**kill_counts(res["trials"]), "capture": res}})
            results.save(finished="smollm2")
    tiny, big = results["tiny"], results.get("smollm2", {}).get("kills", {})
    kills = {k: tiny["kills"][k] + big.get(k, 0) for k in ("tried", "landed", "survived", "identical")}
    results.set("kills", kills)
    results.set("bad_inputs", {k: tiny["bad_inputs"][k] for k in ("tried", "clear", "tracebacks",
                                                                  "written_on_error")})
    results.set("foreign_files", {k: tiny["foreign_files"][k] for k in ("tried", "kept")})
    results.save()
    print(f"faults: kills survived {kills['survived']}/{kills['tried']} (identical {kills['identical']}); "
          f"bad inputs clear {tiny['bad_inputs']['clear']}/{tiny['bad_inputs']['tried']}; foreign files kept "
          f"{tiny['foreign_files']['kept']}/{tiny['foreign_files']['tried']} -> {results.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
