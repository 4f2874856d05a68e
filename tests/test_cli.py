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


# --print-config: every command with settings prints them resolved, as YAML --config reads back
PRINTABLE = {
    "capture": ["--pool", "p.jsonl", "--layers", "0,-1", "--max-len", "64", "--set", "capture.max_tokens=512"],
    "select": ["--pool", "p.jsonl", "--target", "t.jsonl", "--method", "nait", "--budget", "20",
               "--set", "scorer.layers=[1]"],
    "attribute": ["--pool", "p.jsonl", "--method", "projection-diff", "--concept", "pos.jsonl", "neg.jsonl"],
    "train": ["--pool", "p.jsonl", "--lr", "1e-3", "--steps", "3", "--set", "train.lora_r=4"],
    "evaluate": ["--task", "loss", "--pool", "test.jsonl", "--limit", "5"],
    "experiment": ["--pool", "p.jsonl", "--methods", "random,nait", "--steps", "2",
                   "--set", "eval=[{task: loss, data: {path: test.jsonl}}]"],
    "mask-tokens": ["--pool", "p.jsonl", "--domain", "code"],
    "sae train": ["--pool", "p.jsonl", "--layer", "1", "--k", "8"],
}


def print_config(argv: list[str], capsys) -> str:
    assert main([*argv, "--print-config"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


@pytest.mark.parametrize("command", sorted(PRINTABLE))
def test_print_config_round_trips_through_config(command, tmp_path, capsys, no_model, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)  # none of the files exist: nothing is read, nothing written
    printed = print_config([*command.split(), *PRINTABLE[command]], capsys)
    data = yaml.safe_load(printed)
    assert isinstance(data, dict) and "model" in data
    (tmp_path / "printed.yaml").write_text(printed)
    assert print_config([*command.split(), "--config", "printed.yaml"], capsys) == printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml"]


def test_print_config_shows_flags_set_and_the_methods_defaults(tmp_path, capsys, no_model):
    import yaml

    (tmp_path / "base.yaml").write_text("budget: '0.5'\nseed: 3\nscorer:\n  site: mlp\n")
    data = yaml.safe_load(print_config(["select", "--config", str(tmp_path / "base.yaml"), *PRINTABLE["select"],
                                        "--set", "seed=4"], capsys))
    assert data["data"]["path"] == "p.jsonl" and data["target"]["path"] == "t.jsonl"
    assert data["budget"] == "20" and data["seed"] == 4  # flag over --config, --set over both
    # the method's settings in full, as the scorer runs them: given ones and defaults
    assert data["scorer"]["site"] == "mlp" and data["scorer"]["layers"] == [1]
    assert data["scorer"]["drift"] == "last" and data["scorer"]["render"]["max_len"] == 512
    train = yaml.safe_load(print_config(["train", *PRINTABLE["train"]], capsys))["train"]
    assert (train["learning_rate"], train["max_steps"], train["lora_r"]) == (1e-3, 3, 4)


def test_print_config_refuses_what_the_command_would_refuse(capsys, no_model):
    assert main(["select", "--pool", "p.jsonl", "--method", "nait", "--set", "scorer.layrs=[0]",
                 "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "did you mean layers?" in captured.err


# one name for the input data, and the Hugging Face spellings, on every command that has the flag
ALIASES = [("--data", "--pool"), ("--output_dir", "--out"), ("--learning_rate", "--lr"),
           ("--max_steps", "--steps"), ("--max_length", "--max-len")]


def test_every_command_reading_data_takes_pool_and_data():
    from mechsieve.cli import build_parser

    parser, _ = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    sae_train = commands["sae"]._subparsers._group_actions[0].choices["train"]
    parsers = {name: p for name, p in commands.items() if name != "sae"} | {"sae train": sae_train}
    reading = {name for name, p in parsers.items() if "--pool" in p._option_string_actions}
    assert reading == {"attribute", "capture", "evaluate", "experiment", "info", "mask-tokens", "report",
                       "sae train", "select", "train"}
    for name, p in parsers.items():
        for alias, canonical in ALIASES:
            if (name, alias) == ("report", "--output_dir"):  # report's --out is a file, not a folder
                assert alias not in p._option_string_actions
            elif canonical in p._option_string_actions:
                assert p._option_string_actions[alias] is p._option_string_actions[canonical], (name, alias)
            # an HF spelling never stands for anything else
            if alias != "--data" and canonical not in p._option_string_actions:
                assert alias not in p._option_string_actions, (name, alias)


@pytest.mark.parametrize("command, canonical, aliased", [
    ("train", ["--pool", "p.jsonl", "--out", "o", "--lr", "0.001", "--steps", "3", "--max-len", "64"],
     ["--data", "p.jsonl", "--output_dir", "o", "--learning_rate", "0.001", "--max_steps", "3",
      "--max_length", "64"]),
    ("evaluate", ["--task", "loss", "--pool", "t.jsonl", "--out", "o"],
     ["--task", "loss", "--data", "t.jsonl", "--output_dir", "o"]),
    ("capture", ["--pool", "p.jsonl", "--out", "o", "--max-len", "32"],
     ["--data", "p.jsonl", "--output_dir", "o", "--max_length", "32"]),
    ("experiment", ["--pool", "p.jsonl", "--steps", "2", "--out", "o", "--set", "eval=[{task: loss, data: {path: t}}]"],
     ["--data", "p.jsonl", "--max_steps", "2", "--output_dir", "o", "--set", "eval=[{task: loss, data: {path: t}}]"]),
    ("sae train", ["--pool", "p.jsonl", "--out", "o", "--max-len", "32"],
     ["--data", "p.jsonl", "--output_dir", "o", "--max_length", "32"]),
])
def test_aliases_give_the_same_config(command, canonical, aliased, capsys, no_model):
    first = print_config([*command.split(), *canonical], capsys)
    assert print_config([*command.split(), *aliased], capsys) == first
    assert "p.jsonl" in first or "t.jsonl" in first


def test_help_names_pool_first_and_aliases_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--pool, --data PATH" in text and "--out, --output_dir OUT" in text
    assert "--lr, --learning_rate LR" in text and "--steps, --max_steps STEPS" in text
    assert "--print-config" in text and "[--pool PATH]" in text
