"""Caption tokenization (replication/data/tokenizer.py): bert-base-uncased WordPiece rules on a vocabulary the test
writes, the release's truncation and padding to 77, the empty prompt, errors, and caption dropout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from replication.data.tokenizer import (
    MAX_LENGTH,
    CaptionTokenizer,
    VocabularyError,
    VocabularyNotFoundError,
    drop_captions,
)

# bert-base-uncased's layout: [PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then words
SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
WORDS = ["a", "cat", "sat", "on", "the", "mat", "##s", ".", ",", "cafe", "photo", "of", "dog", "red", "un", "##believ",
         "##able", "!", "zebra"]


def _write_vocab(folder: Path) -> Path:
    lines = [f"[unused{i}]" for i in range(104)]
    for token, idx in SPECIAL.items():
        lines[idx] = token
    lines += WORDS
    path = folder / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def vocab(tmp_path) -> Path:
    return _write_vocab(tmp_path)


def _id(word: str) -> int:
    return 104 + WORDS.index(word)


def test_known_words_get_their_vocabulary_ids(vocab):
    tok = CaptionTokenizer(vocab)
    ids = tok("A Cat sat on the MATS. Café, unbelievable zebra!")
    assert ids.dtype == torch.int64 and ids.shape == (1, MAX_LENGTH)
    words = ["a", "cat", "sat", "on", "the", "mat", "##s", ".", "cafe", ",", "un", "##believ", "##able", "zebra", "!"]
    expected = [101] + [_id(w) for w in words] + [102]
    assert ids[0, : len(expected)].tolist() == expected
    assert ids[0, len(expected):].eq(0).all()
    assert 100 not in ids.tolist()[0]  # no [UNK]
    assert tok.vocab_size == 104 + len(WORDS)


def test_unknown_word_is_unk(vocab):
    ids = CaptionTokenizer(vocab)(["a giraffe"])[0]
    assert ids[:4].tolist() == [101, _id("a"), 100, 102]


def test_empty_prompt_is_cls_sep_then_padding(vocab):
    ids = CaptionTokenizer(vocab)(["", "a cat"])
    assert ids.shape == (2, MAX_LENGTH)
    assert ids[0].tolist() == [101, 102] + [0] * (MAX_LENGTH - 2)
    assert ids[1, :4].tolist() == [101, _id("a"), _id("cat"), 102]


def test_truncation_keeps_75_pieces_and_the_closing_sep(vocab):
    caption = " ".join(["dog", "red"] * 60)
    ids = CaptionTokenizer(vocab)([caption])[0]
    assert ids.shape == (MAX_LENGTH,)
    assert ids[0] == 101 and ids[-1] == 102
    assert ids[1:-1].tolist() == [_id("dog"), _id("red")] * 37 + [_id("dog")]
    short = CaptionTokenizer(vocab, max_length=5)(["a cat sat on the mat"])
    assert short.tolist() == [[101, _id("a"), _id("cat"), _id("sat"), 102]]


def test_same_ids_as_transformers_from_pretrained(vocab, monkeypatch):
    """transformers' own reading of a bert vocab.txt (from_pretrained on its folder, the release's loader) with the
    release's call gives the same ids, including truncation and padding."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import BertTokenizerFast

    captions = ["A Cat sat on the MATS. Café, unbelievable zebra!", "", "a giraffe", " ".join(["dog red"] * 50)]
    ref = BertTokenizerFast.from_pretrained(str(vocab.parent))(
        captions, truncation=True, max_length=77, return_length=True, return_overflowing_tokens=False,
        padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(CaptionTokenizer(vocab)(captions), ref)


def test_decode_round_trip(vocab):
    tok = CaptionTokenizer(vocab)
    assert tok.decode(tok(["A red dog sat on the mat.", ""])) == ["a red dog sat on the mat.", ""]


def test_missing_vocabulary_says_where_to_get_it(tmp_path):
    target = tmp_path / "weights" / "vocab.txt"
    with pytest.raises(VocabularyNotFoundError) as info:
        CaptionTokenizer(target)
    msg = str(info.value)
    assert str(target) in msg and "bert-base-uncased" in msg and "vocab.txt" in msg and "huggingface.co" in msg
    assert isinstance(info.value, FileNotFoundError)
    # a folder stands for its vocab.txt
    with pytest.raises(VocabularyNotFoundError, match="vocab.txt"):
        CaptionTokenizer(tmp_path)
    _write_vocab(tmp_path)
    assert CaptionTokenizer(tmp_path).vocab_path == tmp_path / "vocab.txt"


def test_vocabulary_without_special_tokens_is_refused(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("a\ncat\n[UNK]\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"\[PAD\].*\[CLS\].*\[SEP\]"):
        CaptionTokenizer(path)


def test_caption_type_errors(vocab):
    with pytest.raises(TypeError, match="strings"):
        CaptionTokenizer(vocab)(["a cat", 3])
    with pytest.raises(ValueError, match="max_length"):
        CaptionTokenizer(vocab, max_length=1)


def test_drop_captions_rate_and_seed():
    captions = [f"caption {i}" for i in range(20000)]
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    rate = sum(c == "" for c in dropped) / len(captions)
    assert abs(rate - 0.1) < 0.01  # 5 standard deviations of a binomial(20000, 0.1) rate
    assert all(d in ("", c) for d, c in zip(dropped, captions))
    assert dropped == drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert dropped != drop_captions(captions, 0.1, torch.Generator().manual_seed(1))
    assert drop_captions(captions[:5], 0.0) == captions[:5]
    assert drop_captions(captions[:5], 1.0) == [""] * 5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_captions(captions, 1.5)
