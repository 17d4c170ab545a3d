"""BiomedCLIP's tokenizer: BiomedBERT's uncased WordPiece, [CLS] ... [SEP], padded with 0 to 256.

The authors' open_clip cleans each text (HTML entities unescaped twice, whitespace collapsed; also
``ftfy.fix_text``, left out here as in the BiomedParse tokenizer: it only repairs mojibake and curly
quotes) and then calls the hub tokenizer with ``max_length=256, padding='max_length',
truncation=True``: lower case with accents stripped, punctuation and CJK characters split, words
longer than 100 characters become [UNK], and a long text keeps its first 254 pieces so [SEP] stays
last. The model masks every id 0, so the vocabulary's [PAD] must be 0 (it is in BiomedBERT's, with
[UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4); ``load_tokenizer`` refuses a vocabulary where it is not.

The vocabulary comes from the hub repo's files: ``vocab.txt`` (one piece per line, the line number is
the id) or ``tokenizer.json``, or a folder holding either (``vocab.txt`` first, because its settings
are the ones written here rather than the file's). The work is done by the ``tokenizers`` package.
"""
from __future__ import annotations

import html
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from biomedseg.errors import DependencyMissingError, InputError, WeightsMissingError

CONTEXT_LENGTH = 256
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID = 0


def clean(text: str) -> str:
    """open_clip's 'whitespace' cleaning without ftfy: entities unescaped twice, whitespace collapsed."""
    return " ".join(html.unescape(html.unescape(text)).split())


def _vocab_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("vocab.txt", "tokenizer.json"):
            if (path / name).is_file():
                return path / name
        raise WeightsMissingError(f"No vocab.txt or tokenizer.json in '{path}' for BiomedCLIP's tokenizer.")
    if not path.is_file():
        raise WeightsMissingError(f"BiomedCLIP's tokenizer vocabulary '{path}' does not exist.",
                                  hint="It is vocab.txt (or tokenizer.json) of the BiomedCLIP hub repo.")
    return path


@lru_cache(maxsize=4)
def load_tokenizer(path: str, context_length: int = CONTEXT_LENGTH):
    """A ``tokenizers`` tokenizer for ``path``, truncating and padding to ``context_length``."""
    try:
        from tokenizers import Tokenizer
        from tokenizers.implementations import BertWordPieceTokenizer
    except ImportError as exc:
        raise DependencyMissingError("BiomedCLIP's tokenizer needs the 'tokenizers' package.",
                                     hint="Install biomedseg[worker] in the worker's environment.") from exc
    file = _vocab_file(Path(path))
    try:
        if file.suffix == ".json":
            tokenizer = Tokenizer.from_file(str(file))
        else:
            lines = file.read_text(encoding="utf-8").splitlines()
            absent = [t for t in SPECIAL if t not in lines]
            if absent:
                raise InputError(f"'{file}' is not a BERT vocabulary: it lacks {', '.join(absent)}.")
            tokenizer = BertWordPieceTokenizer(str(file), lowercase=True, strip_accents=None, clean_text=True,
                                               handle_chinese_chars=True, wordpieces_prefix="##")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise InputError(f"Could not read BiomedCLIP's tokenizer from '{file}' ({type(exc).__name__}: {exc}).") from exc
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL}
    if ids["[PAD]"] != PAD_ID or ids["[CLS]"] is None or ids["[SEP]"] is None:
        raise InputError(f"'{file}' gives [PAD]={ids['[PAD]']}, [CLS]={ids['[CLS]']}, [SEP]={ids['[SEP]']}; "
                         f"BiomedCLIP's text tower masks id {PAD_ID}, so [PAD] must be {PAD_ID}.")
    tokenizer.enable_truncation(max_length=context_length)  # pieces first, so [SEP] stays last
    tokenizer.enable_padding(direction="right", pad_id=PAD_ID, pad_token="[PAD]", length=context_length)
    return tokenizer


def encode(texts, vocab_path: str | os.PathLike, context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Token ids int64 [N, context_length] of one text or a list of texts."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise InputError("BiomedCLIP's tokenizer takes text (a string or a list of strings).")
    out = np.zeros((len(texts), context_length), dtype=np.int64)
    if texts:
        tokenizer = load_tokenizer(str(Path(vocab_path).resolve()), int(context_length))
        encoded = tokenizer.encode_batch([clean(t) for t in texts])
        out[:] = [e.ids for e in encoded]
    return out


def tokenize(texts, vocab_path: str | os.PathLike, context_length: int = CONTEXT_LENGTH):
    """``encode`` as a torch LongTensor [N, context_length], the input of ``BiomedCLIPNet.encode_text``."""
    import torch

    return torch.from_numpy(encode(texts, vocab_path, context_length))
