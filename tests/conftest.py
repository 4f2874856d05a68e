"""Shared fixtures: a tiny tokenizer trained here and tiny random models built from configs.

Everything is offline and seeded; a model of any architecture builds in well under a second.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny models gain nothing from threads; on a 2-core machine OpenMP spin-waiting made a tiny
# forward+backward 2.6 s instead of 0.1 s (measured by the train stage). One thread for all tests.
torch.set_num_threads(1)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "Write a function to find the similar elements from the given two tuple lists.",
    "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
    "The patient presents with fever and cough. Which of the following is the most likely diagnosis?",
    "Once upon a time there was a little dog who liked to play in the park with a red ball.",
    "You are a helpful assistant. Answer the question step by step. The answer is 12 + 30 = 42.",
] * 4

ARCH_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "qwen3": dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024),
    "gemma2": dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                   sliding_window=64, query_pre_attn_scalar=8),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=3, n_head=4, n_positions=1024, n_inner=64),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=1024, rotary_pct=0.5),
}
FOUR_ARCHS = ["llama", "gemma2", "qwen3", "gpt2"]


def build_tokenizer(folder: Path, chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat:
        fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok-chat")
    build_tokenizer(folder, chat=True)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def plain_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok-plain")
    return build_tokenizer(folder, chat=False)


def build_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(ARCH_CONFIGS[arch])
    model_type = settings.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                               pad_token_id=3, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def make_model(tokenizer):
    cache: dict[str, object] = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            cache[arch] = build_model(arch, len(tokenizer))
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def loaded(make_model, tokenizer):
    """The tiny Llama with its tokenizer, as scorers receive a model."""
    from mechsieve.models.loading import LoadedModel

    return LoadedModel(make_model("llama"), tokenizer, {"name": "tiny-llama", "kind": "test"})


def probe_pool(n: int = 6, tag: str = "x", shift: int = 0):
    """A small in-memory pool mixing math-like and code-like answers of three lengths."""
    from mechsieve.data.records import Example, Pool

    exs = [Example(f"{tag}{i}", "s", [{"role": "user", "content": "Natalia sold clips " * (i % 3 + 1)}],
                   ("The answer is 12 + 30 = 42. " if i % 2 else "def similar_elements(a, b): ") * (i % 3 + 1))
           for i in range(shift, shift + n)]
    return Pool(exs, "mem", "memory", "messages")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer, make_model) -> Path:
    """A saved tiny Llama with its tokenizer, loadable by mechsieve.models.load_model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSIEVE_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- IGDS tests (test_igds*.py): a small mixed task pool ---------------------------------------
IGDS_QA = [("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7. #### 7"),
            ("A box holds 6 eggs. How many eggs in 2 boxes?", "6 * 2 = 12. #### 12"),
            ("Sara reads 5 pages a day for 3 days. How many pages?", "5 * 3 = 15. #### 15"),
            ("Write a poem about the sea.", "The sea is wide and blue."),
            ("Name a colour.", "Red."),
            ("What is 10 minus 4?", "10 - 4 = 6. #### 6")]
"""Three math problems (the task) and three others, as (question, answer)."""


def igds_pool(rows, source: str):
    """A Pool of `rows` (question, answer) with ids `source-i`."""
    from mechsieve.data.records import Example, Pool

    return Pool([Example(f"{source}-{i}", source, [{"role": "user", "content": q}], a, {})
                 for i, (q, a) in enumerate(rows)], "", "memory", "memory")


def ray_test_session(tmp_path_factory, module_name: str):
    """A local 2-CPU Ray for a test module's fixture (yields `ray`): quiet, offline, its own cache;
    the module's classes travel to the actors by value (the workers cannot import tests/)."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"MECHSIEVE_CACHE": str(tmp_path_factory.mktemp("ray-cache")),
                                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    ray.cloudpickle.register_pickle_by_value(sys.modules[module_name])
    yield ray
    ray.shutdown()
