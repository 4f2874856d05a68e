"""Response masks, worked by hand: the decoded masked tokens are exactly the assistant text."""

from types import SimpleNamespace

import numpy as np
import pytest

from mechsieve.config import ConfigError
from mechsieve.data import Example, RenderConfig, pad_id, render_example, render_pool


def ex(prompt, response, id_="x"):
    return Example(id=id_, source="s", prompt=prompt, response=response)


def masked_text(tok, r):
    return tok.decode(r.input_ids[r.response_mask])


def unmasked_text(tok, r):
    return tok.decode(r.input_ids[~r.response_mask])


U = [{"role": "user", "content": "How many clips?"}]


def test_chat_single_turn(tokenizer):
    r = render_example(ex(U, "The answer is 72"), tokenizer)
    assert masked_text(tokenizer, r) == "The answer is 72<|im_end|>\n"
    assert unmasked_text(tokenizer, r) == "<|im_start|>user\nHow many clips?<|im_end|>\n<|im_start|>assistant\n"
    # prompt_len is the first response token; the token before it ends the generation prompt.
    assert r.response_mask[r.prompt_len] and not r.response_mask[r.prompt_len - 1]
    assert tokenizer.decode(r.input_ids[: r.prompt_len]).endswith("<|im_start|>assistant\n")
    assert r.content_start == 1  # token 0 is <|im_start|>, a special token
    assert not r.truncated


def test_chat_multi_turn_all_and_last(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sum 2 and 3"}]
    r_all = render_example(ex(msgs, "5"), tokenizer)
    assert masked_text(tokenizer, r_all) == "Hello<|im_end|>\n5<|im_end|>\n"
    r_last = render_example(ex(msgs, "5"), tokenizer, RenderConfig(response_turns="last"))
    assert masked_text(tokenizer, r_last) == "5<|im_end|>\n"
    assert r_all.prompt_len == r_last.prompt_len


def test_plain_template_when_no_chat_template(plain_tokenizer):
    tok = plain_tokenizer
    r = render_example(ex(U, "72"), tok)
    assert r.input_ids[0] == tok.bos_token_id and r.input_ids[-1] == tok.eos_token_id
    assert masked_text(tok, r) == "72</s>"
    assert tok.decode(r.input_ids[1:r.prompt_len]) == "User: How many clips?\n\nAssistant: "


def test_plain_text_record_is_all_response(tokenizer):
    r = render_example(ex([], "Once upon a time"), tokenizer)
    assert r.input_ids[0] == tokenizer.bos_token_id and r.prompt_len == 1
    assert masked_text(tokenizer, r) == "Once upon a time</s>"
    assert r.last_prompt_index == 0


def test_forced_plain_on_a_chat_tokenizer(tokenizer):
    r = render_example(ex(U, "72"), tokenizer, RenderConfig(template="plain"))
    assert masked_text(tokenizer, r) == "72</s>"


def test_chat_template_required_when_forced(plain_tokenizer):
    with pytest.raises(ConfigError, match="no chat template"):
        render_example(ex(U, "72"), plain_tokenizer, RenderConfig(template="chat"))


def test_generation_prompt_leaves_out_the_response(tokenizer):
    r = render_example(ex(U, "72"), tokenizer, add_generation_prompt=True)
    assert not r.response_mask.any() and r.prompt_len == len(r)
    assert tokenizer.decode(r.input_ids).endswith("<|im_start|>assistant\n")


def test_truncation_is_counted_never_silent(tokenizer):
    long = ex(U, "clips " * 50, "long")
    short = ex(U, "72", "short")
    full = render_example(long, tokenizer)
    rendered, stats = render_pool([long, short], tokenizer, RenderConfig(max_len=20))
    assert len(rendered[0]) == 20 and rendered[0].truncated
    np.testing.assert_array_equal(rendered[0].input_ids, full.input_ids[:20])
    assert stats.truncated == 1 and stats.truncated_ids == ["long"]
    assert "1 truncated" in stats.summary()
    _, stats = render_pool([long], tokenizer, RenderConfig(max_len=5))
    assert stats.no_response_left == 1


def test_bad_render_settings():
    with pytest.raises(ConfigError, match="render.template"):
        RenderConfig(template="fancy")
    with pytest.raises(ConfigError, match="render.max_len"):
        RenderConfig(max_len=1)


@pytest.mark.parametrize("pad,eos,expected", [
    (3, 2, 3),  # the pad token when there is one
    (0, 2, 0),  # id 0 is a pad token like any other, not a missing one
    (None, 2, 2),  # else EOS
    (None, 0, 0),
    (None, None, 0),  # else 0
    (np.int64(7), None, 7),
])
def test_pad_id_is_pad_then_eos_then_zero(pad, eos, expected):
    got = pad_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos))
    assert got == expected and type(got) is int


def test_pad_id_of_the_test_tokenizer(tokenizer):
    assert pad_id(tokenizer) == tokenizer.convert_tokens_to_ids("<pad>") == 3
