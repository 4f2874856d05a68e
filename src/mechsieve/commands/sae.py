"""`mechsieve sae train`: train a TopK SAE on one layer's residual stream; `mechsieve sae info`: describe one."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mechsieve.commands._common import (
    add_config_flags,
    add_data_flags,
    add_model_flags,
    build_config,
    data_flags,
    model_flags,
    print_outputs,
)
from mechsieve.data.readers import DataConfig
from mechsieve.data.render import RenderConfig
from mechsieve.features.sae_train import SaeTrainConfig
from mechsieve.models.loading import ModelConfig

NAME = "sae"
HELP = "sparse autoencoders: train a TopK SAE on a layer (train), or describe one (info)"


@dataclass
class SaeTrainCommand:
    """Settings of `mechsieve sae train`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """Examples whose prompt + response tokens the SAE is trained on (several files: commas)."""
    render: RenderConfig = field(default_factory=RenderConfig)
    sae: SaeTrainConfig = field(default_factory=SaeTrainConfig)
    layer: int = -1
    """Block whose residual output the SAE reads (negative counts from the end)."""
    max_tokens: int = 2048
    """Token budget of one forward batch."""
    out: str = "runs/sae"
    """Output folder: mechsieve_sae.safetensors + mechsieve_sae.json (settings and report)."""
    overwrite: bool = False
    """Retrain even if the folder holds an SAE made under the same settings."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", formatter_class=p.formatter_class,
                       help="train a TopK SAE from streamed activations; reports held-out FVU and dead share")
    add_model_flags(t)
    add_data_flags(t)
    t.add_argument("--layer", type=int, help="block index (negative from the end; default -1)")
    t.add_argument("--d-sae", type=int, help="number of latents (default 4096)")
    t.add_argument("--k", type=int, help="latents per token (default 32)")
    t.add_argument("--epochs", type=int, help="passes over the examples (default 1)")
    t.add_argument("--max-len", "--max_length", type=int, help="longest rendered example (tokens)")
    t.add_argument("--out", "--output_dir", help="output folder (default runs/sae)")
    t.add_argument("--overwrite", action="store_true", help="retrain even if a matching SAE is there")
    add_config_flags(t)
    i = sub.add_parser("info", formatter_class=p.formatter_class,
                       help="describe an SAE folder (SAELens, sparsify or mechsieve format)")
    i.add_argument("path", help="SAE folder or saelens:RELEASE/SAE_ID")
    i.add_argument("--layer", type=int, help="layer, where the files do not say")


def run(args: argparse.Namespace) -> int:
    if args.action == "info":
        from mechsieve.features.sae import load_sae

        for key, value in load_sae(args.path, args.layer).describe().items():
            print(f"{key:<10} {value}")
        return 0
    return train(args)


def train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from mechsieve.data.readers import read_pool
    from mechsieve.data.records import Pool, make_unique_ids
    from mechsieve.features.sae_train import sae_settings, save_sae, train_sae
    from mechsieve.models.hooks import hook_points
    from mechsieve.models.loading import load_model
    from mechsieve.store.artefacts import artefact_exists, load_artefact
    from mechsieve.store.outputs import OutputFolder

    flags = {**model_flags(args), **data_flags(args), "layer": args.layer, "sae.d_sae": args.d_sae,
             "sae.k": args.k, "sae.epochs": args.epochs, "render.max_len": args.max_len, "out": args.out,
             "overwrite": True if args.overwrite else None}
    cfg = build_config(SaeTrainCommand, args, flags)
    # an SAE made under the same settings is reused: its own folder needs no --overwrite
    folder = OutputFolder(cfg.out, "sae train", resumes=True)
    paths = [x.strip() for x in cfg.data.path.split(",") if x.strip()]
    examples = [ex for path in paths for ex in read_pool(replace(cfg.data, path=path)).examples]
    make_unique_ids(examples)
    pool = Pool(examples, cfg.data.path, "memory", "mixed")
    print(f"read {len(pool)} examples from {cfg.data.path}: {pool.counts_by_source()}")
    loaded = load_model(cfg.model)
    layer = hook_points(loaded.model).normalize_layers([cfg.layer])[0]
    settings = sae_settings(loaded, layer, cfg.sae, cfg.render, pool.fingerprint())
    outputs = {"sae": f"{cfg.out}/mechsieve_sae.safetensors", "settings": f"{cfg.out}/mechsieve_sae.json"}
    if artefact_exists(cfg.out, "mechsieve_sae") and not cfg.overwrite:
        _, meta = load_artefact(cfg.out, "mechsieve_sae", expected=settings)  # refuses other settings
        print(f"an SAE with the same settings is already in {cfg.out}: reused it; report: {meta.get('report')}")
        print_outputs(outputs)
        return 0
    folder.claim(["mechsieve_sae.safetensors", "mechsieve_sae.json"])
    trained = train_sae(loaded, pool.examples, layer, cfg.sae, cfg.render, cfg.max_tokens, progress=not args.quiet)
    save_sae(cfg.out, trained, settings)
    folder.finish()
    r = trained.report
    print(f"trained a TopK SAE (d_sae {cfg.sae.d_sae}, k {cfg.sae.k}) at layer {layer} on {r['train_tokens']} tokens "
          f"in {r['train_seconds']} s; held-out ({r['heldout_tokens']} tokens): FVU {r['heldout_fvu']}, "
          f"dead latents {r['heldout_dead_share']}, L0 {r['heldout_l0']}")
    print_outputs(outputs)
    return 0
