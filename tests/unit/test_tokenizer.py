from coati_ray.data.formatting import render_chat, render_prompt

TEXTS = ["Tom has 3 apples and gets 4 more.", "小明有3个苹果，又得到了4个。", "完全没见过的汉字：龘靐齉 and émoji 🙂",
         "mixed 中英文 text\twith\nnewlines"]


def test_encodes_english_and_chinese_with_no_unknown_tokens(tokenizer):
    assert tokenizer.unk_token_id is None  # byte-level BPE needs none: every byte is in the vocabulary
    for t in TEXTS:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == t


def test_demo_words_are_merged_not_spelled_in_bytes(tokenizer):
    # The BPE was trained on the demo data, so its words are few tokens, in both languages.
    assert len(tokenizer(" apples", add_special_tokens=False)["input_ids"]) == 1  # "Ġapples"
    assert len(tokenizer("苹果", add_special_tokens=False)["input_ids"]) <= 2


def test_chat_prompt_is_prefix_of_full_chat_and_ends_with_eos(tokenizer):
    head, full = render_chat(tokenizer, "3 + 4 = ?", "7")
    assert head == render_prompt(tokenizer, "3 + 4 = ?")
    assert full.startswith(head) and full.endswith(tokenizer.eos_token)
    assert full[len(head):] == "7" + tokenizer.eos_token
