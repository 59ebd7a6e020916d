"""Captions -> token ids for the text-to-image LDMs, as the release's `BERTTokenizer`
(ldm/modules/encoders/modules.py):

    BertTokenizerFast.from_pretrained("bert-base-uncased")(text, truncation=True, max_length=77,
        return_length=True, return_overflowing_tokens=False, padding="max_length", return_tensors="pt")["input_ids"]

i.e. [CLS] caption [SEP], cut to 77 ids (75 word pieces at most) and padded with [PAD] (id 0) to exactly 77.

The WordPiece tokenizer is the `tokenizers` library's (the backend of BertTokenizerFast), configured with
bert-base-uncased's rules: BERT normalizer (clean text, CJK characters split, lowercase, accents stripped), BERT
pre-tokenizer (whitespace and punctuation), WordPiece with "##" continuations, [UNK] for a word of no pieces or
longer than 100 characters, and the [CLS] $A [SEP] template. It is built from its parts rather than through
`BertTokenizerFast(vocab_file=...)`, whose keyword changed meaning in transformers 5 (there it maps every word to
[UNK]); tests/test_tokenizer.py checks the ids against transformers' own `from_pretrained` reading of the same file.

The vocabulary is bert-base-uncased's `vocab.txt` (30522 entries, the encoder's vocab_size), which the user
supplies: nothing is downloaded. Caption dropout for classifier-free guidance (`drop_captions`) replaces a caption
by the empty prompt "", the unconditional input of the released txt2img sampler.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

MAX_LENGTH = 77  # the release's BERTTokenizer / BERTEmbedder max_seq_len
VOCAB_FILE = "vocab.txt"
VOCAB_SOURCE = "https://huggingface.co/bert-base-uncased/resolve/main/vocab.txt"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# WordPiece's max_input_chars_per_word in bert-base-uncased (longer words become [UNK])
MAX_WORD_CHARS = 100


class VocabularyNotFoundError(FileNotFoundError):
    """The WordPiece vocabulary file is not where the config says; the message says where to get it."""


class VocabularyError(ValueError):
    """The vocabulary file lacks a token the BERT tokenizer needs."""


def _vocab_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / VOCAB_FILE
    if not p.is_file():
        raise VocabularyNotFoundError(
            f"no WordPiece vocabulary at {p}: the text encoders take bert-base-uncased token ids. Download the file "
            f"{VOCAB_FILE} of the Hugging Face model repository bert-base-uncased ({VOCAB_SOURCE}, 30522 lines) and "
            f"place it at {p}")
    return p


class CaptionTokenizer:
    """Caption batch -> int64 token ids (B, max_length), the release's BERTTokenizer on a local vocab.txt."""

    def __init__(self, vocab_path: str | os.PathLike, max_length: int = MAX_LENGTH):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.vocab_path = _vocab_path(vocab_path)
        vocab = WordPiece.read_file(str(self.vocab_path))
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise VocabularyError(f"{self.vocab_path} lacks the BERT special tokens {missing}; is it bert-base-uncased's "
                                  f"{VOCAB_FILE} ({VOCAB_SOURCE})?")
        self.max_length = max_length
        self.vocab = vocab
        self.pad_id = vocab["[PAD]"]
        tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                  max_input_chars_per_word=MAX_WORD_CHARS))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                    lowercase=True)  # strip_accents None: follows lowercase
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        # truncation=True, max_length: the [CLS]/[SEP] the template adds count towards the length
        tok.enable_truncation(max_length=max_length)
        tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")
        self._tokenizer = tok

    @property
    def vocab_size(self) -> int:
        """Entries of the vocabulary: the text encoder's vocab_size must be at least this (bert-base-uncased 30522)."""
        return len(self.vocab)

    def __call__(self, captions: str | Sequence[str]) -> torch.Tensor:
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        bad = [type(c).__name__ for c in captions if not isinstance(c, str)]
        if bad:
            raise TypeError(f"captions must be strings, got {sorted(set(bad))}")
        encodings = self._tokenizer.encode_batch(captions)
        return torch.tensor([e.ids for e in encodings], dtype=torch.int64).reshape(len(captions), self.max_length)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids (B, L) back to text without the special tokens (for logs and figure captions)."""
        return self._tokenizer.decode_batch([row.tolist() for row in ids.reshape(-1, ids.shape[-1])])


def drop_captions(captions: Sequence[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by the empty prompt "" with probability `p` (training for classifier-free guidance).

    The rate the authors used is not stated in paper or release (the txt2img training config is not public); it is
    a config value. One uniform draw per caption from `generator`, so a seeded run drops the same captions.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption drop probability must be in [0, 1], got {p}")
    captions = list(captions)
    if p == 0.0:
        return captions
    u = torch.rand(len(captions), generator=generator, device=None if generator is None else generator.device)
    return ["" if drop else c for c, drop in zip(captions, (u < p).tolist())]
