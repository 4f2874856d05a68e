"""Flags shared by commands, and turning parsed arguments into a typed config."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

from mechsieve.config import ConfigError, load_config
from mechsieve.data.formats import RecordError
from mechsieve.data.readers import DataError
from mechsieve.engine.base import EngineError
from mechsieve.models.loading import ModelError
from mechsieve.scorers.base import ScorerError
from mechsieve.store.artefacts import SettingsMismatch

T = TypeVar("T")
USER_ERRORS = (ConfigError, DataError, RecordError, ModelError, ScorerError, SettingsMismatch, FileNotFoundError,
               EngineError)


class ConfigPrinted(Exception):
    """`--print-config` printed the resolved settings; the command stops there (exit 0)."""


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file with settings (sections as in the config dataclass)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set capture.max_tokens=8192 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the settings as this command would run them (after --config, flags and --set) "
                        "as YAML that --config reads back, and exit without running")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_engine_flags(parser: argparse.ArgumentParser, shard_help: str = "examples per shard") -> None:
    """--engine local|ray and its settings (section `engine` of the command's config)."""
    parser.add_argument("--engine", choices=["local", "ray"],
                        help="local: in this process (default); ray: Ray Data actors, one model each "
                        "(pip install 'mechsieve[ray]')")
    parser.add_argument("--ray-address", help="Ray cluster to join: auto, ray://HOST:10001 (default: start Ray here)")
    parser.add_argument("--actors", type=int, help="Ray actors, one model each (default 1)")
    parser.add_argument("--gpus-per-actor", type=float, help="GPUs per Ray actor (default 0: CPU)")
    parser.add_argument("--shard-size", type=int,
                        help=f"{shard_help}; finished shards are kept under OUT/shards so a stopped run "
                        "resumes (default: local runs in one pass, ray uses 256)")
    parser.add_argument("--overwrite-shards", action="store_true",
                        help="discard the shards a stopped run left under OUT/shards instead of resuming")
    parser.add_argument("--stream", dest="stream", action="store_const", const="on",
                        help="pool larger than memory: scan it once, hold only its ids here, and let every "
                        "shard read its own records (engine.stream=on; default auto: on above "
                        "engine.stream_above_mb, 512 MB). Not --streaming, which streams a hub dataset")
    parser.add_argument("--no-stream", dest="stream", action="store_const", const="off",
                        help="read the pool into memory whatever its size (engine.stream=off)")


def engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"engine.executor": getattr(args, "engine", None), "engine.ray_address": getattr(args, "ray_address", None),
            "engine.actors": getattr(args, "actors", None), "engine.gpus_per_actor": getattr(args, "gpus_per_actor", None),
            "engine.shard_size": getattr(args, "shard_size", None),
            "engine.overwrite": True if getattr(args, "overwrite_shards", False) else None,
            "engine.stream": getattr(args, "stream", None)}


def resolve_stream(cfg: Any) -> bool:
    """Decide whether the command's pool (`cfg.data`) is streamed (`cfg.engine.stream`; auto: by
    its size on disk) and record the decision in `cfg.engine.stream` (on / off), so that the
    engine and check_engine see it. Cheap: no record is read."""
    from dataclasses import replace

    from mechsieve.data.stream import wants_stream

    streamed = wants_stream(cfg.data, cfg.engine.stream, cfg.engine.stream_above_mb)
    cfg.engine = replace(cfg.engine, stream="on" if streamed else "off")
    return streamed


def read_data(cfg: Any, progress: bool = True) -> Any:
    """The command's pool, as `resolve_stream` decided: scanned (ids only) or read whole."""
    from mechsieve.data.stream import open_pool

    streamed = cfg.engine.stream == "on"
    pool = open_pool(cfg.data, streamed, progress=progress)
    if streamed:
        print(f"streaming the pool: {len(pool)} examples scanned, only their ids held here; every shard of "
              f"{cfg.engine.effective_shard_size()} reads its own records")
    return pool


def check_engine(engine: Any, scorer_cls: type | None = None) -> None:
    """Fail before any model work: Ray missing, or a method the ray engine (or a streamed pool)
    cannot shard."""
    if engine.stream == "on" and scorer_cls is not None and scorer_cls.needs_model and not scorer_cls.shardable:
        from mechsieve.engine.run import shardable_methods

        raise ConfigError(f"engine.stream=on: {scorer_cls.name} needs the whole pool in memory at once, and a "
                          f"streamed pool is held as ids only; methods that stream: {', '.join(shardable_methods())} "
                          "(or --no-stream / engine.stream=off)")
    if engine.executor != "ray":
        return
    from mechsieve.engine.ray_executor import require_ray

    require_ray()
    if scorer_cls is not None and scorer_cls.needs_model and not scorer_cls.shardable:
        from mechsieve.engine.run import shardable_methods

        raise ConfigError(f"--engine ray: {scorer_cls.name} needs the whole pool at once and cannot be sharded; "
                          f"methods that can: {', '.join(shardable_methods())} (or use --engine local)")


def scorer_class(method: str, settings: dict[str, Any] | None, key: str = "scorer") -> type:
    """The scorer class of `method`, with its settings checked (unknown keys named with the method
    they were meant for, values by its config) before any data is read or model loaded."""
    from mechsieve.config import check_settings, from_dict

    cls = method_class(method)
    check_settings(cls.config_cls, settings or {}, f"{key}.", method)
    from_dict(cls.config_cls, settings or {}, prefix=f"{key}.")
    return cls


def method_class(method: str, key: str | None = "method") -> type:
    """The registered scorer class named `method`; an unknown name is a ConfigError (prefixed by
    `key`) listing the methods and suggesting the closest."""
    from mechsieve.config import did_you_mean
    from mechsieve.scorers.registry import RegistryError, available, get_scorer_class

    try:
        return get_scorer_class(method)
    except RegistryError as err:
        raise ConfigError(f"{key + ': ' if key else ''}{err}{did_you_mean(method, available())}") from None


def check_budget(budget: Any) -> None:
    """Refuse a budget that does not parse (whether the pool can meet it is known only later)."""
    from mechsieve.select.budget import SelectionError, parse_budget

    try:
        parse_budget(budget)
    except SelectionError as err:
        raise ConfigError(str(err)) from None


def add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output of an earlier run of this command in OUT (only the files it "
                        "wrote, as listed in OUT/.mechsieve.json; other files there are kept)")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder, hub id, or smollm2-135m-instruct (default)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """--pool (alias --data: every command reads its input data from the same flag) and how to read it."""
    dest = "pool"
    parser.add_argument("--pool", "--data", dest=dest, metavar="PATH",
                        help="data file (.jsonl .json .parquet .csv), saved dataset folder or hub id")
    parser.add_argument("--format", dest=f"{dest}_format",
                        help="auto (default), alpaca, messages, prompt_completion, question_answer, text, mapping")
    parser.add_argument("--field-map", dest=f"{dest}_field_map", metavar="KEY=COL,...",
                        help="columns for format=mapping, e.g. prompt=text,response=code")
    parser.add_argument("--skip-invalid", dest=f"{dest}_skip_invalid", action="store_true",
                        help="skip malformed records (counted and reported) instead of stopping")
    parser.add_argument("--limit", dest=f"{dest}_limit", type=int, help="read at most this many records")
    parser.add_argument("--encoding", dest=f"{dest}_encoding",
                        help="text encoding of .jsonl/.json/.csv files (default utf-8; e.g. latin-1, cp1252)")
    parser.add_argument("--split", dest=f"{dest}_split", metavar="SPLIT",
                        help="split to read, as datasets spells it: train (default), test, train[:1000], "
                        "train[10%%:20%%]; on a file, only the slice applies")
    parser.add_argument("--subset", dest=f"{dest}_subset", metavar="NAME",
                        help="config name of a hub dataset or dataset folder (openai/gsm8k: main or socratic)")
    parser.add_argument("--revision", dest=f"{dest}_revision", help="branch, tag or commit of a hub dataset")
    parser.add_argument("--data-files", dest=f"{dest}_data_files", metavar="GLOB,...",
                        help="files of a hub dataset or dataset folder to read (glob patterns, comma-separated)")
    parser.add_argument("--streaming", dest=f"{dest}_streaming", action="store_true",
                        help="stream a hub dataset: take records as they come, up to --limit")


def parse_field_map(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError(f"--field-map {text!r}: expected KEY=COL pairs separated by commas")
        key, col = part.split("=", 1)
        out[key.strip()] = col.strip()
    return out


def data_flags(args: argparse.Namespace, flag: str = "pool", key: str = "data") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, flag, None):
        out[f"{key}.path"] = getattr(args, flag)
    if getattr(args, f"{flag}_format", None):
        out[f"{key}.format"] = getattr(args, f"{flag}_format")
    if getattr(args, f"{flag}_field_map", None):
        out[f"{key}.field_map"] = parse_field_map(getattr(args, f"{flag}_field_map"))
    if getattr(args, f"{flag}_skip_invalid", False):
        out[f"{key}.skip_invalid"] = True
    if getattr(args, f"{flag}_limit", None):
        out[f"{key}.limit"] = getattr(args, f"{flag}_limit")
    for name in ("encoding", "split", "subset", "revision"):
        if getattr(args, f"{flag}_{name}", None):
            out[f"{key}.{name}"] = getattr(args, f"{flag}_{name}")
    if getattr(args, f"{flag}_data_files", None):
        files = [f.strip() for f in getattr(args, f"{flag}_data_files").split(",") if f.strip()]
        out[f"{key}.data_files"] = files[0] if len(files) == 1 else files
    if getattr(args, f"{flag}_streaming", False):
        out[f"{key}.streaming"] = True
    return out


def model_flags(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "model", None):
        out["model.name"] = args.model
    if getattr(args, "device", None):
        out["model.device"] = args.device
    return out


def build_config(cls: type[T], args: argparse.Namespace, flags: dict[str, Any]) -> T:
    """The command's settings: defaults < --config < flags (dotted keys; None: not given) < --set.
    With --print-config they are printed as YAML and the command stops (ConfigPrinted, exit 0)."""
    cfg = load_config(cls, getattr(args, "config", None), getattr(args, "overrides", []),
                      {k: v for k, v in flags.items() if v is not None})
    if getattr(args, "print_config", False):
        print(resolved_yaml(cfg), end="")
        raise ConfigPrinted
    return cfg


def resolved_yaml(cfg: Any) -> str:
    """`cfg` as YAML; a `scorer` section paired with a `method` (select, attribute) is given in
    full, the method's defaults included, as the scorer will run it."""
    from mechsieve.config import from_dict, to_dict, to_yaml

    data = to_dict(cfg)
    if isinstance(getattr(cfg, "scorer", None), dict) and isinstance(getattr(cfg, "method", None), str):
        if "," in cfg.method:  # select with several methods: each method's settings in full, by name
            from mechsieve.commands.select import method_list, method_settings

            settings = method_settings(method_list(cfg.method), cfg.scorer)
            data["scorer"] = {m: to_dict(from_dict(method_class(m).config_cls, s, prefix=f"scorer.{m}."))
                              for m, s in settings.items()}
        else:
            scorer = scorer_class(cfg.method, cfg.scorer)
            data["scorer"] = to_dict(from_dict(scorer.config_cls, cfg.scorer, prefix="scorer."))
    return to_yaml(data)


def int_list(text: str) -> list[int] | str:
    if text.strip() == "all":
        return "all"
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ConfigError(f"--layers {text!r}: expected 'all' or integers like 0,5,-1") from err


def print_outputs(paths: dict[str, Path | str]) -> None:
    """Every command ends by saying where its outputs went (under the CLI, with the log.txt of
    what it printed)."""
    from mechsieve.store.runlog import current_log

    log = current_log()
    if log is not None and "log" not in paths:
        paths = {**paths, "log": log}
    print("outputs:")
    width = max(len(k) for k in paths)
    for key, path in paths.items():
        print(f"  {key.ljust(width)}  {path}")
