"""Training as Hugging Face users expect it: checkpoints and an exact resume, loss lines at an
interval, trackers, gradient checkpointing, bf16 autocast, and no accelerate state inherited."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechsieve.config import ConfigError
from mechsieve.data import read_pool
from mechsieve.models.loading import LoadedModel
from mechsieve.train import TrainConfig, items_from_examples, train
from mechsieve.train import checkpoints as ckpt
from mechsieve.train.logs import interval_mean, is_due

pytestmark = pytest.mark.timeout(300)

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "mechsieve" / "data" / "samples"
# 6 items in micro-batches of 2: 3 per epoch; 2 per step, so 6 steps cross 4 epochs
CFG = dict(max_steps=6, learning_rate=2e-2, lora_r=4, lora_alpha=8, lora_dropout=0.1, max_batch=2, grad_accum=2,
           schedule="cosine", warmup_steps=1, seed=3)


def _loaded(make_model, tokenizer) -> LoadedModel:
    return LoadedModel(copy.deepcopy(make_model("llama")), tokenizer, {"kind": "test", "arch": "llama"})


@pytest.fixture(scope="module")
def items(tokenizer):
    return items_from_examples(read_pool(SAMPLES / "gsm8k_train.jsonl", limit=6).examples, tokenizer)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


class Stop(KeyboardInterrupt):
    """The run killed right after a checkpoint was written."""


def test_a_run_stopped_and_resumed_equals_the_uninterrupted_run(make_model, tokenizer, items, tmp_path,
                                                                monkeypatch):
    cfg = TrainConfig(**CFG, save_steps=2, save_total_limit=2, logging_steps=1)
    whole = train(_loaded(make_model, tokenizer), items, cfg, out_dir=tmp_path / "a", progress=False)
    assert [s for s, _ in ckpt.checkpoints(tmp_path / "a")] == [4, 6]  # the newest 2 of 2, 4, 6
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth", ckpt.STATE):
        assert (tmp_path / "a" / "checkpoint-4" / name).is_file(), name

    real = ckpt.save_checkpoint

    def save_then_die(out_dir, step, *args, **kwargs):
        path = real(out_dir, step, *args, **kwargs)
        if step == 4:
            raise Stop
        return path

    with monkeypatch.context() as mp:
        mp.setattr(ckpt, "save_checkpoint", save_then_die)
        with pytest.raises(Stop):
            train(_loaded(make_model, tokenizer), items, cfg, out_dir=tmp_path / "b", progress=False)
    out = tmp_path / "b"
    assert not (out / "train.json").exists() and not (out / "adapter_model.safetensors").exists()
    # what a kill during the next save would leave: a temporary folder, and a checkpoint-6 that a
    # non-atomic writer would have left without its state; neither may be resumed from
    (out / ".checkpoint-6.x1y2.tmp").mkdir()
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"torn")
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-4"

    resumed = train(_loaded(make_model, tokenizer), items, cfg, out_dir=out, progress=False, resume=True)
    assert resumed.resumed_from == out / "checkpoint-4"
    assert resumed.steps == whole.steps == 6
    assert resumed.tokens == whole.tokens
    assert resumed.loss_curve == pytest.approx(whole.loss_curve, rel=1e-6, abs=0)
    a, b = _adapter(tmp_path / "a"), _adapter(out)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)
    # the checkpoint the resume read is the uninterrupted run's own step-4 state
    for key, value in _adapter(tmp_path / "a" / "checkpoint-4").items():
        torch.testing.assert_close(_adapter(out / "checkpoint-4")[key], value)
    assert [(r["step"], round(r["loss"], 6)) for r in _log(out)] == \
        [(r["step"], round(r["loss"], 6)) for r in _log(tmp_path / "a")]
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4, 5, 6]  # nothing logged twice
    info = json.loads((out / "train.json").read_text())
    assert info["settings"]["resumed_from"]["step"] == 4 and info["loss_curve"] == resumed.loss_curve
    assert [s for s, _ in ckpt.checkpoints(out)] == [4, 6]  # the resumed run saved step 6 over the torn one


def test_the_dropout_generator_is_what_makes_the_resume_exact(make_model, tokenizer, items, tmp_path, monkeypatch):
    """A resume that did not put the generators back draws other dropout masks: a different run.
    (So the equality above rests on the saved RNG state, not on dropout being idle.)"""
    cfg = TrainConfig(**CFG, save_steps=3, logging_steps=0)
    whole = train(_loaded(make_model, tokenizer), items, cfg, out_dir=tmp_path / "a", progress=False)
    (tmp_path / "a" / "train.json").unlink()
    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)
    other = train(_loaded(make_model, tokenizer), items, cfg, out_dir=tmp_path / "a", progress=False,
                  resume=tmp_path / "a" / "checkpoint-3")
    assert other.loss_curve[:3] == whole.loss_curve[:3]
    assert other.loss_curve[3:] != pytest.approx(whole.loss_curve[3:], rel=1e-9, abs=0)


def test_resume_refuses_a_checkpoint_of_other_settings_and_accepts_new_logging(make_model, tokenizer, items,
                                                                               tmp_path):
    cfg = TrainConfig(**CFG, save_steps=2, logging_steps=2)
    train(_loaded(make_model, tokenizer), items, cfg, out_dir=tmp_path / "a", progress=False)
    other = TrainConfig(**{**CFG, "learning_rate": 1e-3}, save_steps=2)
    with pytest.raises(ConfigError, match=r"train\.learning_rate: 0\.02 there, 0\.001 here"):
        train(_loaded(make_model, tokenizer), items, other, out_dir=tmp_path / "a", progress=False, resume=True)
    with pytest.raises(ConfigError, match="items"):
        train(_loaded(make_model, tokenizer), items[:5], cfg, out_dir=tmp_path / "a", progress=False,
              resume=tmp_path / "a" / "checkpoint-2")
    # the run folder given: its newest checkpoint; only the logging interval changed
    res = train(_loaded(make_model, tokenizer), items, TrainConfig(**CFG, save_steps=2, logging_steps=3),
                out_dir=tmp_path / "a", progress=False, resume=tmp_path / "a")
    assert res.resumed_from == tmp_path / "a" / "checkpoint-6"


def test_resume_latest_in_a_fresh_folder_starts_at_step_0_and_a_bad_path_is_refused(make_model, tokenizer,
                                                                                     items, tmp_path, caplog):
    cfg = TrainConfig(**{**CFG, "max_steps": 2})
    with caplog.at_level(logging.WARNING, logger="mechsieve"):
        res = train(_loaded(make_model, tokenizer), items, cfg, out_dir=tmp_path / "new", progress=False,
                    resume="latest")
    assert res.resumed_from is None and len(res.loss_curve) == 2
    assert "no checkpoint in" in caplog.text and "training from step 0" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished checkpoint"):
        train(_loaded(make_model, tokenizer), items, cfg, out_dir=tmp_path / "new", resume=tmp_path / "empty")
    with pytest.raises(ConfigError, match="save_steps=2 writes checkpoints into the output folder"):
        train(_loaded(make_model, tokenizer), items, TrainConfig(**CFG, save_steps=2))


def test_a_fresh_run_removes_an_earlier_runs_checkpoints_only(make_model, tokenizer, items, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-99").mkdir(parents=True)
    (out / "checkpoint-99" / ckpt.STATE).write_text("{}")
    (out / ".checkpoint-7.ab.tmp").mkdir()
    (out / "checkpoint-notes").mkdir()  # not a checkpoint name: someone else's
    train(_loaded(make_model, tokenizer), items, TrainConfig(**{**CFG, "max_steps": 1}), out_dir=out, progress=False)
    assert not (out / "checkpoint-99").exists() and not (out / ".checkpoint-7.ab.tmp").exists()
    assert (out / "checkpoint-notes").is_dir()


def test_interval_means_and_when_a_line_is_due():
    losses = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [interval_mean(losses, s, 2) for s in (2, 4, 5)] == [1.5, 3.5, 5.0]
    assert interval_mean(losses, 3, 3) == 2.0 and interval_mean(losses, 5, 10) == 3.0
    assert [s for s in range(1, 6) if is_due(s, 5, 2)] == [2, 4, 5]
    assert not any(is_due(s, 5, 0) for s in range(1, 6))


def test_cli_prints_loss_lines_under_quiet_and_keeps_them(model_dir, tmp_path, capsys):
    from mechsieve.cli import main

    argv = ["train", "--model", str(model_dir), "--data", str(SAMPLES / "gsm8k_train.jsonl"), "--limit", "4",
            "--steps", "3", "--logging_steps", "2", "--quiet", "--set", "train.lora_r=2"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "train:" not in err.replace("mechsieve.train:", "")  # no progress bar under --quiet
    lines = [ln for ln in err.splitlines() if ln.startswith("mechsieve.train: step ")]
    assert [ln.split()[2] for ln in lines] == ["2/3", "3/3"]
    curve = json.loads((tmp_path / "run" / "train.json").read_text())["loss_curve"]
    records = _log(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 3]
    assert records[0]["loss"] == pytest.approx((curve[0] + curve[1]) / 2) and records[1]["loss"] == pytest.approx(curve[2])
    assert f"loss {records[0]['loss']:.4f}" in lines[0]
    log_txt = (tmp_path / "run" / "log.txt").read_text()
    assert lines[0] in log_txt and lines[1] in log_txt
    # --log-level warning: the info lines are not printed (the jsonl is kept all the same)
    assert main([*argv, "--out", str(tmp_path / "quiet"), "--log-level", "warning"]) == 0
    assert "mechsieve.train: step" not in capsys.readouterr().err
    assert [r["step"] for r in _log(tmp_path / "quiet")] == [2, 3]


def test_a_missing_tracker_package_fails_first_with_the_install_command(make_model, tokenizer, items, tmp_path,
                                                                         monkeypatch, capsys):
    import accelerate.tracking

    import mechsieve.train.logs as logs
    from mechsieve.cli import main

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])  # neither installed
    loaded = _loaded(make_model, tokenizer)
    for tracker, install in (("wandb", "pip install wandb"), ("tensorboard", "pip install tensorboard")):
        with pytest.raises(ConfigError, match=f"report_to={tracker} needs the {tracker} package.*: {install} "):
            train(loaded, items, TrainConfig(max_steps=1, report_to=tracker), out_dir=tmp_path / "t")
    assert not hasattr(loaded.model, "peft_config")  # refused before the model was touched
    # the CLI: one line, before the model loads (this model folder does not exist)
    code = main(["train", "--model", str(tmp_path / "no-model"), "--data", str(SAMPLES / "gsm8k_train.jsonl"),
                 "--report-to", "wandb", "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install wandb" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(logs, "require_tracker", lambda name: None)  # as if installed: the folder is asked for
    with pytest.raises(ConfigError, match="tensorboard writes its event files into the output folder"):
        train(loaded, items, TrainConfig(max_steps=1, report_to="tensorboard"))


def test_tensorboard_run_writes_an_events_file(make_model, tokenizer, items, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    train(_loaded(make_model, tokenizer), items, TrainConfig(max_steps=2, logging_steps=1, report_to="tensorboard"),
          out_dir=out, progress=False)
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = []
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            scalars += [(s.step, s.value) for s in acc.Scalars("train/loss")]
    logged = [(r["step"], r["loss"]) for r in _log(out)]
    assert [s for s, _ in scalars] == [s for s, _ in logged] == [1, 2]
    assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6)


def _spy(loaded: LoadedModel) -> list[torch.dtype]:
    """The dtype of each output of the first block's MLP down-projection (one per call: forward, and
    the recompute in backward under gradient checkpointing)."""
    dtypes: list[torch.dtype] = []
    loaded.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    return dtypes


def test_gradient_checkpointing_recomputes_and_trains_the_same(make_model, tokenizer, items):
    cfg = dict(max_steps=2, lora_dropout=0.0, max_batch=6, lora_r=4, learning_rate=1e-2)
    runs = {}
    for on in (False, True):
        loaded = _loaded(make_model, tokenizer)
        calls = _spy(loaded)
        res = train(loaded, items, TrainConfig(**cfg, gradient_checkpointing=on), progress=False)
        runs[on] = (res, len(calls), {k: v.detach().clone() for k, v in loaded.model.state_dict().items() if "lora_" in k})
        base = loaded.model.get_base_model()
        assert not any(getattr(m, "gradient_checkpointing", False) for m in base.modules())  # switched off again
    assert runs[False][1] == 2 and runs[True][1] == 4  # one micro-batch per step; the block runs again in backward
    assert runs[True][0].loss_curve == pytest.approx(runs[False][0].loss_curve, rel=1e-6)
    for key, value in runs[False][2].items():
        torch.testing.assert_close(runs[True][2][key], value, rtol=1e-5, atol=1e-6)


def test_bf16_autocasts_on_cpu_with_a_warning_and_comes_off_after(make_model, tokenizer, items, caplog):
    cfg = dict(max_steps=2, lora_dropout=0.0, max_batch=6, lora_r=4)
    fp32 = train(_loaded(make_model, tokenizer), items, TrainConfig(**cfg), progress=False)
    loaded = _loaded(make_model, tokenizer)
    dtypes = _spy(loaded)
    with caplog.at_level(logging.WARNING, logger="mechsieve"):
        res = train(loaded, items, TrainConfig(**cfg, mixed_precision="bf16"), progress=False)
    assert set(dtypes) == {torch.bfloat16} and res.settings["mixed_precision"] == "bf16"
    assert "bf16 is meant for GPUs" in caplog.text
    # bf16 rounding: close to the float32 run, not equal to it
    assert res.loss_curve == pytest.approx(fp32.loss_curve, rel=2e-2)
    assert res.loss_curve != pytest.approx(fp32.loss_curve, rel=1e-7, abs=0)
    dtypes.clear()
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor(items[0].input_ids)[None]).logits
    assert logits.dtype == torch.float32 and set(dtypes) == {torch.float32}  # the autocast wrapper is gone


@pytest.fixture
def accelerate_state():
    """accelerate's process-wide states as they were before the test, put back after it."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    classes = (AcceleratorState, GradientState, PartialState)
    saved = [dict(c._shared_state) for c in classes]
    yield
    for c, state in zip(classes, saved):
        c._shared_state.clear()
        c._shared_state.update(state)


def test_training_does_not_inherit_a_bf16_accelerator_state(make_model, tokenizer, items, accelerate_state):
    """A TRL / Trainer run leaves accelerate's state at bf16 in the process; mechsieve's run keeps
    float32 and puts that state back afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    Accelerator(mixed_precision="bf16", cpu=True)  # as TRL's SFTTrainer(bf16=True) leaves it
    assert AcceleratorState().mixed_precision == "bf16"
    loaded = _loaded(make_model, tokenizer)
    dtypes = _spy(loaded)
    res = train(loaded, items, TrainConfig(max_steps=1, lora_dropout=0.0, max_batch=6), progress=False)
    assert dtypes and set(dtypes) == {torch.float32}
    assert res.settings["mixed_precision"] == "no"
    assert AcceleratorState().mixed_precision == "bf16"  # the other run's state, as it was


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: --print-config must not load one."""
    import mechsieve.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_model", refuse)


def test_cli_flags_and_hf_spellings_reach_the_config(capsys, no_model):
    import yaml

    from mechsieve.cli import main

    def printed(*flags):
        assert main(["train", "--pool", "p.jsonl", *flags, "--print-config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    ours = printed("--save-steps", "5", "--save-total-limit", "1", "--logging-steps", "3", "--report-to", "none",
                   "--gradient-checkpointing", "--mixed-precision", "bf16", "--resume")
    hf = printed("--save_steps", "5", "--save_total_limit", "1", "--logging_steps", "3", "--report_to", "none",
                 "--gradient_checkpointing", "--bf16", "--resume_from_checkpoint", "latest")
    assert ours == hf
    t = ours["train"]
    assert (t["save_steps"], t["save_total_limit"], t["logging_steps"], t["report_to"]) == (5, 1, 3, "none")
    assert t["gradient_checkpointing"] is True and t["mixed_precision"] == "bf16" and ours["resume"] == "latest"
    assert printed("--resume", "runs/x/checkpoint-4")["resume"] == "runs/x/checkpoint-4"
    default = printed()
    assert default["resume"] == "" and default["train"]["save_steps"] == 0 and default["train"]["logging_steps"] == 10


def test_cli_resume_continues_a_stopped_run_in_its_folder(model_dir, tmp_path, monkeypatch, capsys):
    from mechsieve.cli import main

    argv = ["train", "--model", str(model_dir), "--data", str(SAMPLES / "gsm8k_train.jsonl"), "--limit", "4",
            "--steps", "4", "--save-steps", "2", "--quiet", "--set", "train.lora_r=2", "--set", "train.max_batch=2"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    real = ckpt.save_checkpoint

    def save_then_die(out_dir, step, *args, **kwargs):
        real(out_dir, step, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(ckpt, "save_checkpoint", save_then_die)
        assert main([*argv, "--out", str(tmp_path / "run")]) == 130
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "run"), "--resume"]) == 0  # no --overwrite needed
    assert "4 steps (resumed at step 2)" in capsys.readouterr().out
    whole = json.loads((tmp_path / "whole" / "train.json").read_text())["loss_curve"]
    assert json.loads((tmp_path / "run" / "train.json").read_text())["loss_curve"] == pytest.approx(whole, rel=1e-6)
    log_txt = (tmp_path / "run" / "log.txt").read_text()
    assert log_txt.count("# mechsieve train") == 2 and "interrupted" in log_txt  # both runs, appended
    # finished output with no checkpoint to continue: --resume is no licence to train it anew
    plain = [a for a in argv if a not in ("--save-steps", "2")]
    assert main([*plain, "--out", str(tmp_path / "done")]) == 0
    capsys.readouterr()
    assert main([*plain, "--out", str(tmp_path / "done"), "--resume"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
