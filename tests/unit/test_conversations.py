"""Multi-turn masks: decoded back, the trained tokens are exactly the assistant turns, for each template shape."""

import copy

import pytest

from coati_ray.data import formatting as fmt
from coati_ray.data.conversations import ChatError, read_messages, render_for_training

CHATML_DEFAULT_SYSTEM = (  # Qwen2.5-style: a default system prompt when the conversation has none
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
NO_BOS = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
DROPS_EARLIER_THINKING = (  # Qwen3-style: an assistant turn before the last loses its <think> block
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and not loop.last %}"
    "{{ '<|assistant|>\\n' + m['content'].split('</think>')[-1].lstrip() + eos_token }}"
    "{%- elif m['role'] == 'assistant' %}{{ '<|assistant|>\\n' + m['content'] + eos_token }}"
    "{%- else %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}")

DIALOGUE = [{"role": "system", "content": "You are a helpful math tutor."},
            {"role": "user", "content": "Tom has 3 apples and gets 4 more. How many apples does Tom have now?"},
            {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."},
            {"role": "user", "content": "小明有9个苹果，送给朋友4个苹果。小明还剩多少个苹果？"},
            {"role": "assistant", "content": "9 - 4 = 5，答案是5。"}]


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def trained_pieces(tok, item) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    pieces, run = [], []
    for i, label in zip(item.input_ids, item.labels):
        if label != fmt.IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            pieces.append(tok.decode(run))
            run = []
    if run:
        pieces.append(tok.decode(run))
    return pieces


@pytest.mark.parametrize("shape,end", [("ours", "</s>"), ("chatml_default_system", "<|im_end|>\n"), ("no_bos", "</s>")])
def test_every_assistant_turn_and_only_it_is_trained(tokenizer, shape, end):
    templates = {"ours": tokenizer.chat_template, "chatml_default_system": CHATML_DEFAULT_SYSTEM, "no_bos": NO_BOS}
    template = templates[shape]
    tok = with_template(tokenizer, template)
    for msgs in (DIALOGUE, DIALOGUE[1:]):  # with and without a system turn (ChatML then adds its default one)
        item, fallback = fmt.tokenize_conversation(tok, msgs, max_len=512)
        assert not fallback
        assert trained_pieces(tok, item) == [m["content"] + end for m in msgs if m["role"] == "assistant"]
        assert tok.decode(item.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    if shape == "chatml_default_system":
        assert "You are a helpful assistant." in tok.decode(fmt.tokenize_conversation(tok, DIALOGUE[1:], 512)[0]
                                                            .input_ids)
    if shape == "no_bos":
        assert not tok.apply_chat_template(DIALOGUE, tokenize=False).startswith(tok.bos_token)


def test_last_turn_only(tokenizer):
    item, _ = fmt.tokenize_conversation(tokenizer, DIALOGUE, 512, train_on="last")
    assert trained_pieces(tokenizer, item) == ["9 - 4 = 5，答案是5。</s>"]


def test_a_template_that_re_renders_history_falls_back_to_the_last_turn_and_says_so(tokenizer):
    tok = with_template(tokenizer, DROPS_EARLIER_THINKING)
    thinking = copy.deepcopy(DIALOGUE)
    thinking[2]["content"] = "<think>3 and 4 make 7</think>3 + 4 = 7. The answer is 7."
    r = render_for_training(tok, thinking)
    assert r.fallback and "<think>" not in r.text  # the text the template gives for the whole conversation
    item, fallback = fmt.tokenize_conversation(tok, thinking, 512)
    assert fallback
    assert trained_pieces(tok, item) == ["9 - 4 = 5，答案是5。</s>"]  # never the re-rendered earlier turn
    # the same template with no thinking block renders consistently: every turn is trained
    item, fallback = fmt.tokenize_conversation(tok, DIALOGUE, 512)
    assert not fallback and len(trained_pieces(tok, item)) == 2


def test_a_single_turn_conversation_tokenizes_as_the_instruction_format_does(tokenizer):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
    conv, _ = fmt.tokenize_conversation(tokenizer, msgs, 512)
    single = fmt.tokenize_sft(tokenizer, "What is 2 + 3?", "2 + 3 = 5.", 512)
    assert (conv.input_ids, conv.labels) == (single.input_ids, single.labels)


def test_truncation_keeps_the_mask_aligned(tokenizer):
    full, _ = fmt.tokenize_conversation(tokenizer, DIALOGUE, 512)
    n = full.labels.index(full.input_ids[-1])  # inside the last assistant turn
    cut, _ = fmt.tokenize_conversation(tokenizer, DIALOGUE, n + 2)
    assert cut.input_ids == full.input_ids[:n + 2] and cut.labels == full.labels[:n + 2]
    first_turn = next(i for i, x in enumerate(full.labels) if x != fmt.IGNORE_INDEX)
    assert fmt.tokenize_conversation(tokenizer, DIALOGUE, first_turn)[0] is None  # no assistant token left


def test_without_a_chat_template_multi_turn_is_refused_and_single_turn_is_alpaca(tokenizer):
    plain = with_template(tokenizer, None)
    with pytest.raises(ChatError, match="needs a tokenizer with a chat template"):
        fmt.tokenize_conversation(plain, DIALOGUE, 512)
    item, _ = fmt.tokenize_conversation(plain, DIALOGUE[1:3], 512)
    assert trained_pieces(plain, item) == ["3 + 4 = 7. The answer is 7.</s>"]
    assert "### Response:" in plain.decode(item.input_ids)


@pytest.mark.parametrize("turns,message", [
    ([], "the conversation is empty"),
    ([{"role": "bot", "content": "hi"}], "turn 0: unknown role 'bot'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
     "turn 2: expected a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "turn 1: a system turn is only allowed"),
    ([{"role": "user", "content": 3}], "turn 0: content must be text, got int"),
    ([{"role": "user", "content": "a"}], "no assistant turn"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}], "turn 0: empty content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "turn 2: the conversation ends with a user turn"),
    ([{"speaker": "user", "text": "a"}], "turn 0: expected 'role'/'from' and 'content'/'value'"),
])
def test_bad_conversations_name_the_turn(turns, message):
    with pytest.raises(ChatError) as e:
        read_messages(turns, need_assistant=True)
    assert str(e.value).startswith(message)


def test_the_three_turn_formats_read_the_same():
    openai = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    sharegpt = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    colossal = [{"from": "user", "content": "a"}, {"from": "assistant", "content": "b"}]
    assert read_messages(openai) == read_messages(sharegpt) == read_messages(colossal) == openai
