"""The command line on a tiny model: outputs land where it says, errors are one clear line."""

import json

import numpy as np
import pytest

from conftest import write_jsonl
from mechsieve.cli import main


@pytest.fixture
def pool_file(tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}. #### {2 * i}"} for i in range(6)]
    return write_jsonl(tmp_path / "pool.jsonl", rows)


def test_capture_command_writes_and_reuses(model_dir, pool_file, tmp_path, capsys):
    out = tmp_path / "acts"
    argv = ["capture", "--model", str(model_dir), "--pool", str(pool_file), "--out", str(out),
            "--layers", "0,-1", "--reductions", "mean_response,last_prompt", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"{out}/activations.safetensors" in text and "read 6 examples (question_answer)" in text
    from safetensors.numpy import load_file

    arrays = load_file(str(out / "activations.safetensors"))
    assert arrays["mean_response"].shape == (6, 2, 32) and arrays["last_prompt"].shape == (6, 2, 32)
    meta = json.loads((out / "activations.json").read_text())
    assert meta["layers"] == [0, 2] and len(meta["ids"]) == 6
    assert not (out / "chunks").exists()
    assert main(argv) == 0
    assert "already there: reused it" in capsys.readouterr().out
    # Same folder, other settings: refused, naming the setting.
    assert main(argv[:-5] + ["--layers", "1", "--reductions", "mean_response,last_prompt", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "capture.layers: [0, -1] there, [1] here" in err and "--overwrite" in err


def test_set_and_config_file(model_dir, pool_file, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("capture:\n  layers: [1]\n  reductions: [drift]\nrender:\n  max_len: 16\n")
    out = tmp_path / "o"
    assert main(["capture", "--model", str(model_dir), "--pool", str(pool_file), "--out", str(out),
                 "--config", str(cfg), "--set", "capture.max_tokens=64", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "6 truncated to max_len" in text
    meta = json.loads((out / "activations.json").read_text())
    assert meta["settings"]["capture"]["max_tokens"] == 64 and meta["layers"] == [1]


def test_errors_are_one_line_with_exit_2(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    assert main(["capture", "--model", str(model_dir), "--pool", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'answer'" in err and "Traceback" not in err
    assert main(["capture", "--model", str(model_dir), "--pool", str(bad), "--set", "capture.site=attn"]) == 2
    assert "capture.site='attn' is not allowed" in capsys.readouterr().err


def test_info_on_model_and_pool(model_dir, pool_file, capsys):
    assert main(["info", "--model", str(model_dir), "--pool", str(pool_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["n_layers"] == 3 and info["model"]["model_type"] == "llama"
    assert info["data"]["records"] == 6 and info["data"]["format"] == "question_answer"
    assert info["data"]["tokens"]["min"] > 5 and info["data"]["sources"] == {"pool": 6}


def test_python_dash_m(pool_file):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mechsieve", "info", "--pool", str(pool_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "records: 6" in proc.stdout


def test_captured_values_match_the_api(model_dir, pool_file, tmp_path):
    from safetensors.numpy import load_file

    from mechsieve.capture import CaptureConfig, capture_pool
    from mechsieve.data import read_pool
    from mechsieve.models import load_model

    out = tmp_path / "o"
    assert main(["capture", "--model", str(model_dir), "--pool", str(pool_file), "--out", str(out), "--quiet"]) == 0
    result, _ = capture_pool(load_model(str(model_dir)), read_pool(pool_file), CaptureConfig(), progress=False)
    np.testing.assert_allclose(load_file(str(out / "activations.safetensors"))["mean_response"],
                               result.arrays["mean_response"], atol=1e-6)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: settings must be refused before."""
    import mechsieve.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--method", "nait", "--budget", "abc"], "budget 'abc' is not understood"),
    (["--method", "random", "--budget", "0"], "budget 0 must be a count >= 1"),
    (["--method", "nat"], "method: unknown method 'nat'; available: "),
    (["--method", "nat"], "; did you mean nait?"),
    (["--method", "nait", "--set", "scorer.layrs=[0]"],
     "scorer.layrs: nait has no setting layrs; its settings are: render, max_tokens, "),
    (["--method", "nait", "--set", "scorer.layrs=[0]"], "; did you mean layers?"),
    (["--method", "nait", "--set", "scorer.render.mx_len=8"],
     "scorer.render.mx_len: nait's render section has no setting mx_len; its settings are: max_len, "),
    (["--method", "nait", "--set", "scorer.site=attn"], "scorer.site='attn' is not allowed"),
])
def test_select_checks_settings_before_reading_the_pool_or_loading_the_model(extra, message, tmp_path, capsys,
                                                                             no_model):
    missing = tmp_path / "not-here.jsonl"  # a pool read first would be refused as missing instead
    code = main(["select", "--pool", str(missing), "--target", str(missing), "--out", str(tmp_path / "o"),
                 "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "not-here" not in err, err
    assert not (tmp_path / "o").exists()


def test_attribute_and_experiment_check_settings_first(tmp_path, capsys, no_model):
    missing = str(tmp_path / "not-here.jsonl")
    assert main(["attribute", "--pool", missing, "--concept", missing, missing, "--quiet",
                 "--set", "scorer.max_lenn=64"]) == 2
    err = capsys.readouterr().err
    assert "scorer.max_lenn: vector-filter has no setting max_lenn; its settings are: " in err
    assert "did you mean max_len?" in err
    import yaml

    base = {"pool": {"path": missing}, "methods": ["random", "nait"], "steps": 1,
            "eval": [{"task": "loss", "data": {"path": missing}}]}
    cases = [({"methods": ["random", "nat"]}, "methods: unknown method 'nat'; available: "),
             ({"budget": "lots"}, "budget 'lots' is not understood"),
             ({"method_settings": {"nait": {"layrs": [0]}}},
              "method_settings.nait.layrs: nait has no setting layrs; its settings are: "),
             ({"method_settings": {"niat": {}}}, "method_settings.niat: unknown method 'niat'")]
    for change, message in cases:
        (tmp_path / "exp.yaml").write_text(yaml.safe_dump({**base, **change}))
        assert main(["experiment", "--config", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "e"),
                     "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "not-here" not in err, err


def test_an_unknown_setting_suggests_the_close_one(model_dir, tmp_path, capsys):
    assert main(["capture", "--model", str(model_dir), "--pool", str(tmp_path / "none.jsonl"), "--quiet",
                 "--set", "capture.layrs=[0]"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) capture.layrs; CaptureConfig has: " in err and "did you mean capture.layers?" in err
