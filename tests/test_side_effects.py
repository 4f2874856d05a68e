"""No side effects on import or call: loading a model and writing tokenized items switch the Hugging
Face progress bars off only while they run and put back what was there; importing any mechsieve
module leaves logging, warnings filters and progress bars as they were."""

import importlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mechsieve.progress import progress_bar_enabled, progress_bars_off


def bar_states() -> dict[str, bool]:
    from huggingface_hub.utils import are_progress_bars_disabled

    return {"transformers": progress_bar_enabled("transformers"), "datasets": progress_bar_enabled("datasets"),
            "hub": not are_progress_bars_disabled(), "hub group": not are_progress_bars_disabled("mechsieve.test")}


@pytest.fixture(params=["enabled", "disabled"])
def starting_state(request):
    """Every switch set to one state (the hub's group the other way, to see it survive), then the
    bars as they were before the test."""
    import datasets
    from transformers.utils import logging as hf_logging

    progress_bar_states = importlib.import_module("huggingface_hub.utils.tqdm").progress_bar_states
    before = (hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(), dict(progress_bar_states))
    on = request.param == "enabled"
    (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
    (datasets.enable_progress_bars if on else datasets.disable_progress_bars)()
    progress_bar_states["mechsieve.test"] = not on
    state = bar_states()
    assert state == {"transformers": on, "datasets": on, "hub": on, "hub group": not on}
    yield state
    (hf_logging.enable_progress_bar if before[0] else hf_logging.disable_progress_bar)()
    (datasets.enable_progress_bars if before[1] else datasets.disable_progress_bars)()
    progress_bar_states.clear()
    progress_bar_states.update(before[2])


def test_load_model_puts_the_progress_bars_back(starting_state, model_dir, monkeypatch):
    import transformers

    from mechsieve.models.loading import load_model

    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(progress_bar_enabled("transformers"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    loaded = load_model(str(model_dir))
    assert loaded.model.config.model_type == "llama"
    assert seen == [False]  # quiet while loading
    assert bar_states() == starting_state


def test_a_failed_load_puts_the_progress_bars_back(starting_state, model_dir, monkeypatch):
    import transformers

    from mechsieve.models.loading import ModelError, load_model

    def broken(*args, **kwargs):
        raise OSError("no weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ModelError, match="no weights"):
        load_model(str(model_dir))
    assert bar_states() == starting_state


def test_save_tokenized_puts_the_progress_bars_back(starting_state, tmp_path, monkeypatch):
    import datasets

    from mechsieve.train import TrainItem, load_tokenized, save_tokenized

    seen = []
    original = datasets.Dataset.save_to_disk

    def spy(self, *args, **kwargs):
        seen.append(progress_bar_enabled("datasets"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", spy)
    items = [TrainItem(np.arange(5), np.array([-100, -100, 2, 3, 4])), TrainItem(np.arange(3), np.arange(3))]
    save_tokenized(tmp_path / "items", items)
    assert seen == [False]
    assert [it.labels.tolist() for it in load_tokenized(tmp_path / "items")] == [[-100, -100, 2, 3, 4], [0, 1, 2]]
    assert bar_states() == starting_state


def test_progress_bars_off_restores_after_an_error(starting_state):
    with pytest.raises(RuntimeError), progress_bars_off("datasets"):
        assert not progress_bar_enabled("datasets")
        raise RuntimeError("inside")
    assert bar_states() == starting_state


def test_importing_every_module_changes_no_global_state(tmp_path):
    """In a fresh interpreter: the third-party packages mechsieve imports at module level first
    (their own import effects are theirs), then every mechsieve module; logging, warnings filters,
    progress bars and a few torch / numpy switches must be as before."""
    script = textwrap.dedent("""
        import importlib, logging, pkgutil, sys, warnings
        import numpy, torch, tqdm.auto, yaml  # what mechsieve modules import at the top
        import datasets, huggingface_hub.utils, transformers.utils.logging as tl  # to read their switches

        def state():
            loggers = {name: (lg.level, len(lg.handlers), lg.propagate, lg.disabled)
                       for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
            changed = {name: v for name, v in loggers.items() if v != (0, 0, True, False)}
            return {"root": (logging.root.level, len(logging.root.handlers)), "loggers": changed,
                    "disable": logging.root.manager.disable, "warnings": list(warnings.filters),
                    "bars": (tl.is_progress_bar_enabled(), tl.get_verbosity(), datasets.is_progress_bar_enabled(),
                             huggingface_hub.utils.are_progress_bars_disabled()),
                    "torch": (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled(),
                              torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()),
                    "numpy": (numpy.geterr(), numpy.get_printoptions())}

        before = state()
        import mechsieve
        names = [m.name for m in pkgutil.walk_packages(mechsieve.__path__, "mechsieve.")
                 if m.name != "mechsieve.__main__"]
        for name in names:
            importlib.import_module(name)
        after = state()
        for key in before:
            if before[key] != after[key]:
                print(f"CHANGED {key}: {before[key]!r} -> {after[key]!r}")
        print(f"imported {len(names)} modules")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "CHANGED" not in proc.stdout, proc.stdout
    assert int(proc.stdout.split("imported ")[1].split()[0]) > 80
