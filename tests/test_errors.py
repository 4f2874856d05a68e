"""Errors a user can cause reach the command line as one clear line with exit code 2, naming the
thing at fault and the setting that fixes it; where no command reaches a path cheaply, the library
raises a user error type (one the CLI turns into that line)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from conftest import write_jsonl
from mechsieve.cli import main
from mechsieve.config import ConfigError
from mechsieve.data.readers import DataError


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mechsieve ")]
    assert len(lines) == 1 and lines[0].startswith(f"mechsieve {command}: error: "), err
    return lines[0]


@pytest.fixture
def qa_pool(tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}. #### {2 * i}"} for i in range(4)]
    return write_jsonl(tmp_path / "pool.jsonl", rows)


def test_train_without_any_label_token(model_dir, tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    write_jsonl(items, [{"input_ids": [1, 5, 6, 7], "labels": [-100] * 4} for _ in range(3)])
    code = main(["train", "--data", str(items), "--model", str(model_dir), "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "adapter")])
    assert code == 2
    line = _one_line_error(capsys, "train")
    assert "none of the 3 items has a label token" in line and "render.max_len" in line


def test_train_lora_targets_matching_nothing(model_dir, qa_pool, tmp_path, capsys):
    code = main(["train", "--data", str(qa_pool), "--model", str(model_dir), "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "adapter"), "--set", "train.target_modules=[nope_proj]"])
    assert code == 2
    line = _one_line_error(capsys, "train")
    assert "train.target_modules=['nope_proj'] match no module" in line and "q_proj" in line


def test_multiple_choice_without_options(model_dir, qa_pool, tmp_path, capsys):
    code = main(["evaluate", "--task", "multiple_choice", "--data", str(qa_pool), "--model", str(model_dir),
                 "--quiet", "--out", str(tmp_path / "ev")])
    assert code == 2
    line = _one_line_error(capsys, "evaluate")
    assert f"{qa_pool}: example " in line and "no options found" in line and "meta.options" in line


def test_multi_otsu_on_too_few_values(model_dir, tmp_path, capsys):
    pool = write_jsonl(tmp_path / "tiny.jsonl", [{"question": "How many clips?", "answer": "72"}])
    code = main(["mask-tokens", "--pool", str(pool), "--model", str(model_dir), "--domain", "math",
                 "--attributes", "tr", "--preset", "paper", "--out", str(tmp_path / "masked"), "--quiet"])
    assert code == 2
    line = _one_line_error(capsys, "mask-tokens")
    assert "cannot make 5 classes" in line and "xtf.tr_classes" in line


def test_multi_otsu_errors_are_config_errors():
    from mechsieve.tokens.otsu import multi_otsu

    with pytest.raises(ConfigError, match="classes=1"):
        multi_otsu(np.arange(10.0), classes=1)
    with pytest.raises(ConfigError, match="no finite values"):
        multi_otsu(np.array([np.nan, np.inf]))
    with pytest.raises(ConfigError, match=r"only 2 distinct .* cannot make 3 classes.*xtf\.tr_classes"):
        multi_otsu(np.array([0.0, 1.0, 1.0, 0.0]), classes=3)


def test_attribution_refuses_nan_scores_naming_the_method():
    from mechsieve.evaluate.attribution import attribution_metrics

    scores = np.array([0.3, np.nan, 0.1, np.nan])
    labels = np.array([True, False, False, True])
    with pytest.raises(DataError, match=r"vector-filter gave NaN scores to 2 of 4 examples \(first at position 1\)"):
        attribution_metrics(scores, labels, method="vector-filter")


def test_attribution_refuses_labels_without_a_positive():
    from mechsieve.evaluate.attribution import attribution_metrics, average_precision

    scores = np.array([0.3, 0.2, 0.1])
    with pytest.raises(DataError, match=r"none of the 3 examples is labelled positive.*label_field"):
        attribution_metrics(scores, np.zeros(3, dtype=bool))
    assert np.isnan(average_precision(scores, np.zeros(3, dtype=bool)))  # the bare metric stays NaN


def test_attribution_shape_and_fraction_errors_are_user_errors():
    from mechsieve.evaluate.attribution import precision_at_k, removal_experiment

    with pytest.raises(DataError, match=r"3 scores for 2 labels"):
        precision_at_k(np.zeros(3), np.zeros(2), 1)
    with pytest.raises(ConfigError, match="k=5"):
        precision_at_k(np.zeros(3), np.ones(3), 5)
    with pytest.raises(ConfigError, match="removal fraction 1.5"):
        removal_experiment(["a", "b"], np.zeros(2), [1.5], lambda ids: ids, len)


def test_render_cannot_locate_assistant_turn(tokenizer):
    from mechsieve.data.records import Example
    from mechsieve.data.render import RenderConfig, render_example

    tok = copy.deepcopy(tokenizer)
    # A template that rewrites earlier assistant turns (as reasoning models drop their thinking).
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[earlier]"
                         "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    ex = Example("m1", "s", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "first answer"},
                             {"role": "user", "content": "again"}], "second answer")
    with pytest.raises(ConfigError, match=r"cannot locate assistant turn 1 .*render\.response_turns=last"):
        render_example(ex, tok, RenderConfig())
    assert render_example(ex, tok, RenderConfig(response_turns="last")).response_mask.any()


def test_lora_errors_are_config_errors(make_model, tokenizer):
    from mechsieve.models.loading import LoadedModel
    from mechsieve.train import TrainConfig, load_adapter
    from mechsieve.train.lora import wrap_for_training

    model = copy.deepcopy(make_model("llama"))
    with pytest.raises(ConfigError, match=r"train.target_modules=\['nope'\] match no module"):
        wrap_for_training(model, TrainConfig(target_modules=["nope"]))
    with pytest.raises(FileNotFoundError, match="neither a LoRA adapter"):
        load_adapter(LoadedModel(model, tokenizer, {}), "/nonexistent-adapter")


def test_adapter_for_another_base_model_is_a_config_error(make_model, tokenizer, tmp_path):
    from mechsieve.models.loading import LoadedModel
    from mechsieve.train import load_adapter

    other = copy.deepcopy(make_model("gpt2"))
    other.save_pretrained(tmp_path / "full")
    with pytest.raises(ConfigError, match=r"weights do not fit this base model.*--model"):
        load_adapter(LoadedModel(copy.deepcopy(make_model("llama")), tokenizer, {}), tmp_path / "full")


def test_malformed_tokenized_items_name_file_and_line(tmp_path):
    from mechsieve.train import load_tokenized

    bad = tmp_path / "items.jsonl"
    bad.write_text(json.dumps({"input_ids": [1, 2], "labels": [1, 2]}) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        load_tokenized(bad)
    bad.write_text(json.dumps({"input_ids": [[1, 2]], "labels": [[1, 2]]}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}: row 0: input_ids and labels must be lists of token ids"):
        load_tokenized(bad)


def test_training_with_more_processes_than_micro_batches_is_a_config_error():
    from mechsieve.train import TrainConfig, TrainItem
    from mechsieve.train.loop import micro_batches

    items = [TrainItem(np.arange(4), np.arange(4))]
    with pytest.raises(ConfigError, match=r"1 micro-batches for 2 processes.*train\.max_tokens"):
        next(micro_batches(items, TrainConfig(), rank=0, world=2))


def test_concept_errors_are_user_errors(tmp_path):
    from mechsieve.features.probes import (
        Concept,
        ConceptConfig,
        diff_of_means,
        load_decoder,
        sae_direction,
    )

    with pytest.raises(DataError, match="1 positive, 0 negative"):
        diff_of_means(np.ones((1, 4)), np.ones((0, 4)))
    with pytest.raises(DataError, match="the concept direction is zero"):
        _ = Concept(np.zeros(4, np.float32), 0).unit
    with pytest.raises(ConfigError, match=r"concept\.sae_feature=3 is out of range"):
        sae_direction(np.ones((3, 4)), 3)
    from safetensors.numpy import save_file

    save_file({"weights": np.ones((2, 4), np.float32)}, str(tmp_path / "sae.safetensors"))
    with pytest.raises(ConfigError, match=r"concept\.sae_decoder=.*no decoder matrix"):
        load_decoder(str(tmp_path / "sae.safetensors"))
    assert ConceptConfig().method == "diff_means"


def test_concept_made_for_another_model_is_refused_by_the_cli(model_dir, qa_pool, tmp_path, capsys):
    from mechsieve.features.probes import fit_concept, save_concept

    rng = np.random.default_rng(0)
    other = {"kind": "folder", "path": "/elsewhere/other-model", "hash": "0123456789abcdef"}
    concept = fit_concept(rng.normal(size=(4, 32)), rng.normal(size=(4, 32)), 1,
                          settings={"model": other})  # same width (32) as the tiny model
    save_concept(tmp_path / "concept", concept)
    code = main(["attribute", "--pool", str(qa_pool), "--model", str(model_dir), "--concept-dir",
                 str(tmp_path / "concept"), "--quiet", "--out", str(tmp_path / "attr")])
    assert code == 2
    line = _one_line_error(capsys, "attribute")
    assert "was fitted for model" in line and "0123456789abcdef" in line and str(model_dir.resolve()) in line
    assert not (tmp_path / "attr" / "ranking.jsonl").exists()


def test_concept_of_another_width_is_refused(loaded, tmp_path):
    from mechsieve.features.probes import fit_concept, save_concept
    from mechsieve.scorers.concept import ConceptSource, resolve_concept

    rng = np.random.default_rng(0)
    save_concept(tmp_path / "c", fit_concept(rng.normal(size=(4, 16)), rng.normal(size=(4, 16)), 1))
    with pytest.raises(ConfigError, match=r"direction of width 16.*width 32"):
        resolve_concept(loaded, ConceptSource(concept_dir=str(tmp_path / "c")), progress=False)


def test_concept_for_the_same_model_is_accepted(loaded, tmp_path):
    from mechsieve.features.probes import fit_concept, save_concept
    from mechsieve.scorers.concept import ConceptSource, resolve_concept

    rng = np.random.default_rng(0)
    moved = {**loaded.identity, "path": "/a/copy/elsewhere", "dtype": "bfloat16"}
    save_concept(tmp_path / "c", fit_concept(rng.normal(size=(4, 32)), rng.normal(size=(4, 32)), 1,
                                             settings={"model": moved}))
    concept = resolve_concept(loaded, ConceptSource(concept_dir=str(tmp_path / "c")), progress=False)
    assert concept.direction.shape == (32,)


def test_layer_out_of_range_names_the_blocks(model_dir, qa_pool, tmp_path, capsys):
    code = main(["capture", "--model", str(model_dir), "--pool", str(qa_pool), "--layers", "99", "--quiet",
                 "--out", str(tmp_path / "acts")])
    assert code == 2
    line = _one_line_error(capsys, "capture")
    assert "layer 99 is out of range: this model has 3 blocks (0..2" in line and "--layers" in line


def test_model_and_target_errors_are_user_errors(make_model):
    from mechsieve.capture.activations import check_positions
    from mechsieve.capture.gradients import linear_modules
    from mechsieve.features.neurons import first_component
    from mechsieve.models.hooks import hook_points

    with pytest.raises(ConfigError, match="lower render.max_len to at most 1024"):
        check_positions(make_model("llama"), 2000)
    with pytest.raises(ConfigError, match="no layers chosen"):
        hook_points(make_model("llama")).normalize_layers([])
    with pytest.raises(ConfigError, match=r"no nn.Linear modules \(mlp\).*GPT-2 uses Conv1D"):
        linear_modules(make_model("gpt2"), [0], "mlp")
    with pytest.raises(DataError, match="at least 2 target examples, got 1.*--target"):
        first_component(np.ones((1, 4)))
