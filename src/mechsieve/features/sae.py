"""Sparse autoencoders (SAEs) on the residual stream: one interface, three on-disk formats.

`SparseAutoencoder` holds `W_enc: [d_in, d_sae]`, `b_enc: [d_sae]`, `W_dec: [d_sae, d_in]`,
`b_dec: [d_in]`, an activation (`relu`, `jumprelu` with a per-latent `threshold`, `topk` with
`k`) and the block whose residual output it reads (`layer`, in `mechsieve.models.hooks` numbering:
the output of block `l`). `encode(h) -> a`, `decode(a) -> h_hat`, `error(h) = h - decode(encode(h))`.

Loaders (`load_sae`), chosen by what the folder holds:
- mechsieve's own trained SAEs (`mechsieve_sae.safetensors` + `.json`, see `features.sae_train`);
- SAELens folders: `cfg.json` + `sae_weights.safetensors` (W_enc, b_enc, W_dec, b_dec, and
  `threshold` for JumpReLU); the activation comes from `architecture` (v6: standard, jumprelu,
  topk with `k`) or, in older configs, `activation_fn`/`activation_fn_str` with
  `activation_fn_kwargs.k`. SAELens TopK keeps the k largest pre-activations, then ReLU;
- EleutherAI sparsify folders: `cfg.json` + `sae.safetensors` (`encoder.weight: [d_sae, d_in]`,
  `encoder.bias`, `W_dec`, `b_dec`); always TopK, applied after the ReLU, input minus `b_dec`. A
  checkpoint with one subfolder per hook point (`layers.6/`) is read at `layers.{layer}`;
- `saelens:RELEASE/SAE_ID`: SAELens's pretrained releases through the optional `sae_lens`
  package (`make sae`); needs the network, so it is not covered by the offline tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechsieve.config import ConfigError

ARTEFACT = "mechsieve_sae"
ACTIVATIONS = ("relu", "jumprelu", "topk")


class SaeError(ConfigError):
    """An SAE that cannot be read, or that does not fit the model it is used with (a ConfigError,
    so the CLI reports it in one line: the fix is a setting, the SAE path or its layer)."""


@dataclass
class SparseAutoencoder:
    """An SAE on one layer's residual stream; shapes in the module docstring."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    activation: str = "topk"
    k: int = 0
    threshold: torch.Tensor | None = None
    layer: int | None = None
    apply_b_dec_to_input: bool = True
    source: str = ""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise SaeError(f"SAE activation {self.activation!r} is not supported; supported: {ACTIVATIONS}")
        d_in, d_sae = self.W_enc.shape
        shapes = {"b_enc": (self.b_enc.shape, (d_sae,)), "W_dec": (self.W_dec.shape, (d_sae, d_in)),
                  "b_dec": (self.b_dec.shape, (d_in,))}
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise SaeError(f"{self.source or 'SAE'}: {name} has shape {tuple(got)}, expected {want} "
                               f"from W_enc {tuple(self.W_enc.shape)}")
        if self.activation == "topk" and not 0 < self.k <= d_sae:
            raise SaeError(f"{self.source or 'SAE'}: topk needs 0 < k <= d_sae={d_sae}, got k={self.k}")
        if self.activation == "jumprelu" and (self.threshold is None or self.threshold.shape != (d_sae,)):
            raise SaeError(f"{self.source or 'SAE'}: jumprelu needs a threshold of shape ({d_sae},)")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> SparseAutoencoder:
        """Move every tensor (in place) and return self."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device=device, dtype=dtype))
        return self

    def pre_activation(self, h: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] encoder pre-activations of `h: [..., d_in]`."""
        x = h.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Latents `a: [..., d_sae]` (dense, non-negative) of `h: [..., d_in]`."""
        pre = self.pre_activation(h)
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        values, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(values))

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        """Reconstruction `[..., d_in]` of latents `a: [..., d_sae]`."""
        return a.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def error(self, h: torch.Tensor) -> torch.Tensor:
        """The SAE error term `h - decode(encode(h))`, so that decode(encode(h)) + error == h."""
        return h.to(self.W_dec.dtype) - self.decode(self.encode(h))

    def check_model(self, model: Any, layer: int | None = None) -> None:
        """Refuse an SAE whose width is not the model's hidden size (both numbers named)."""
        from mechsieve.models.hooks import unwrap

        cfg = unwrap(model).config
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        if hidden is not None and int(hidden) != self.d_in:
            raise SaeError(f"the SAE ({self.source or 'in memory'}) reads vectors of width d_in={self.d_in}, but the "
                           f"model's hidden size is {hidden}: it was trained on another model")
        n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        use = self.layer if layer is None else layer
        if use is not None and n_layers is not None and not 0 <= use < n_layers:
            raise SaeError(f"the SAE is at layer {use}, but the model has {n_layers} blocks (0..{n_layers - 1})")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "d_in": self.d_in, "d_sae": self.d_sae, "activation": self.activation,
                "k": self.k, "layer": self.layer}


# --- loading ---------------------------------------------------------------------------------

def _f32(tensors: dict[str, torch.Tensor], name: str, where: Path) -> torch.Tensor:
    if name not in tensors:
        raise SaeError(f"{where}: tensor {name!r} is missing; found {sorted(tensors)}")
    return tensors[name].float()


def _layer_from_hook(hook: str) -> int | None:
    """SAELens hook names -> output of block `l`: `blocks.8.hook_resid_post` is 8 and
    `blocks.8.hook_resid_pre` is 7 (the residual before block 8 is the output of block 7)."""
    m = re.search(r"blocks\.(\d+)\.hook_resid_(pre|post|mid)", hook or "")
    if not m:
        m = re.search(r"layers\.(\d+)$", hook or "")
        return int(m.group(1)) if m else None
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "mid":
        raise SaeError(f"hook {hook!r} reads the residual stream between attention and MLP; only block "
                       "outputs (hook_resid_post / the next block's hook_resid_pre) are supported")
    if kind == "pre":
        if layer == 0:
            raise SaeError(f"hook {hook!r} reads the embeddings (before block 0); only block outputs are supported")
        return layer - 1
    return layer


def load_saelens_folder(folder: Path, layer: int | None = None) -> SparseAutoencoder:
    """An SAELens-format folder: cfg.json + sae_weights.safetensors (see the module docstring)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    arch = str(cfg.get("architecture", "standard"))
    act_fn = str(cfg.get("activation_fn", cfg.get("activation_fn_str", "relu")))
    k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0)
    if arch in ("gated",):
        raise SaeError(f"{folder}: SAELens architecture {arch!r} is not supported (standard, jumprelu, topk are)")
    activation = "jumprelu" if arch == "jumprelu" else "topk" if (arch == "topk" or act_fn == "topk") else "relu"
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, False, "none"):
        raise SaeError(f"{folder}: normalize_activations={norm!r} rescales inputs at run time; only 'none' "
                       "is supported (fold the scaling into the weights first)")
    if "scaling_factor" in tensors and not torch.allclose(tensors["scaling_factor"].float(), torch.ones(1)):
        raise SaeError(f"{folder}: a scaling_factor other than 1 is not supported")
    meta = cfg.get("metadata") or {}
    hook = str(cfg.get("hook_name") or meta.get("hook_name") or "")
    return SparseAutoencoder(
        _f32(tensors, "W_enc", folder), _f32(tensors, "b_enc", folder), _f32(tensors, "W_dec", folder),
        _f32(tensors, "b_dec", folder), activation, k,
        tensors["threshold"].float() if activation == "jumprelu" and "threshold" in tensors else None,
        layer if layer is not None else _layer_from_hook(hook),
        bool(cfg.get("apply_b_dec_to_input", True)), f"saelens:{folder}")


def load_sparsify_folder(folder: Path, layer: int | None = None) -> SparseAutoencoder:
    """An EleutherAI sparsify folder: cfg.json + sae.safetensors (TopK; see the module docstring)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise SaeError(f"{folder}: sparsify transcoders / skip connections are not SAEs of one residual stream")
    tensors = load_file(str(folder / "sae.safetensors"))
    enc = _f32(tensors, "encoder.weight", folder)  # [d_sae, d_in]
    return SparseAutoencoder(
        enc.T.contiguous(), _f32(tensors, "encoder.bias", folder), _f32(tensors, "W_dec", folder),
        _f32(tensors, "b_dec", folder), "topk", int(cfg.get("k", 0)), None,
        layer if layer is not None else _layer_from_hook(folder.name), True, f"sparsify:{folder}")


def load_mechsieve_folder(folder: Path, layer: int | None = None) -> SparseAutoencoder:
    """An SAE trained here (`mechsieve sae train`): mechsieve_sae.safetensors + .json."""
    from mechsieve.store.artefacts import load_artefact

    tensors, meta = load_artefact(folder, ARTEFACT)
    s = meta["settings"]
    t = {k: torch.from_numpy(v.copy()).float() for k, v in tensors.items()}
    sae = SparseAutoencoder(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], s.get("activation", "topk"),
                            int(s.get("k", 0)), t.get("threshold"), None if s.get("layer") is None else int(s["layer"]),
                            True, f"mechsieve:{folder}")
    if layer is not None and layer != sae.layer:
        raise SaeError(f"{folder}: this SAE was trained at layer {sae.layer}, not layer {layer}")
    return sae


def write_sae(folder: str | Path, sae: SparseAutoencoder, settings: dict[str, Any] | None = None,
              extra: dict[str, Any] | None = None) -> Path:
    """Save `sae` in mechsieve's format (mechsieve_sae.safetensors + .json); returns the folder."""
    from mechsieve.store.artefacts import save_artefact

    base = {"activation": sae.activation, "k": sae.k, "layer": sae.layer, "d_in": sae.d_in, "d_sae": sae.d_sae}
    save_artefact(folder, ARTEFACT, sae.tensors(), {**base, **(settings or {})}, extra=extra)
    return Path(folder)


def random_sae(d_in: int, d_sae: int, layer: int | None = None, activation: str = "relu", k: int = 0,
               seed: int = 0) -> SparseAutoencoder:
    """An untrained SAE with unit-norm random decoder rows and W_enc = W_dec^T (a baseline, and
    a fixture for tests)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_sae, d_in, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    threshold = torch.full((d_sae,), 0.1) if activation == "jumprelu" else None
    return SparseAutoencoder(w.T.contiguous(), torch.zeros(d_sae), w, torch.zeros(d_in), activation, k, threshold,
                             layer, True, f"random(seed={seed})")


def load_pretrained(spec: str, device: str = "cpu") -> SparseAutoencoder:
    """`saelens:RELEASE/SAE_ID` through the optional sae_lens package (network; not tested offline)."""
    try:
        from sae_lens import SAE  # type: ignore[import-not-found]
    except ImportError as err:
        raise SaeError("pretrained SAE releases need the optional sae_lens package: run `make sae` "
                       "(pip install -e '.[sae]'), or give a local SAELens / sparsify folder") from err
    release, _, sae_id = spec.removeprefix("saelens:").partition("/")
    loaded = SAE.from_pretrained(release, sae_id, device=device)
    sae_obj = loaded[0] if isinstance(loaded, tuple) else loaded
    cfg = sae_obj.cfg.to_dict() if hasattr(sae_obj.cfg, "to_dict") else dict(vars(sae_obj.cfg))
    arch = cfg.get("architecture") or getattr(sae_obj.cfg, "architecture", "standard")
    arch = str(arch() if callable(arch) else arch)  # SAELens 6: a method of the config class
    k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0)
    activation = "jumprelu" if arch == "jumprelu" else "topk" if arch == "topk" or k else "relu"
    hook = str(cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name") or "")
    w = {name: getattr(sae_obj, name).detach().float().cpu() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    threshold = sae_obj.threshold.detach().float().cpu() if activation == "jumprelu" else None
    return SparseAutoencoder(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], activation, k, threshold,
                             _layer_from_hook(hook), bool(cfg.get("apply_b_dec_to_input", True)), spec)


def load_sae(spec: str | Path, layer: int | None = None, device: str = "cpu") -> SparseAutoencoder:
    """Load an SAE from a folder (mechsieve, SAELens or sparsify format) or `saelens:RELEASE/ID`.

    layer: the block whose output it reads, when the files do not say (or to pick `layers.N/` in
    a sparsify checkpoint with one subfolder per hook point).
    """
    text = str(spec)
    if text.startswith("saelens:"):
        return load_pretrained(text, device).to(device)
    folder = Path(text)
    if not folder.is_dir():
        raise SaeError(f"SAE {text!r}: no such folder (give a folder with cfg.json + sae_weights.safetensors "
                       "(SAELens), cfg.json + sae.safetensors (sparsify), one made by `mechsieve sae train`, "
                       "or saelens:RELEASE/SAE_ID)")
    if (folder / f"{ARTEFACT}.json").exists():
        return load_mechsieve_folder(folder, layer).to(device)
    if (folder / "cfg.json").exists() and (folder / "sae_weights.safetensors").exists():
        return load_saelens_folder(folder, layer).to(device)
    if (folder / "cfg.json").exists() and (folder / "sae.safetensors").exists():
        return load_sparsify_folder(folder, layer).to(device)
    if layer is not None and (folder / f"layers.{layer}").is_dir():
        return load_sae(folder / f"layers.{layer}", layer, device)
    raise SaeError(f"{folder}: not an SAE folder: expected cfg.json + sae_weights.safetensors (SAELens), "
                   f"cfg.json + sae.safetensors (sparsify), {ARTEFACT}.json (mechsieve), or a subfolder "
                   "layers.N with the layer given")
