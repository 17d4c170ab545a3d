"""CLIP byte-level BPE tokenizer, written without ftfy, regex, transformers or open_clip.

BiomedParse v1 tokenises prompts with CLIP's tokenizer (``openai/clip-vit-base-patch32``):
lower-cased, <|startoftext|> ... <|endoftext|>, padded to 77 with <|endoftext|> (49407),
attention mask 1 on the real tokens (SOT and EOT included). The decoder consumes exactly
the masked tokens and the prompt embedding is read at the first EOT, so ids must match
bit for bit.

The vocabulary can come from either source of the same data:
* ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI / open_clip merges file), or
* a Hugging Face ``vocab.json`` + ``merges.txt`` pair.
``find_bpe_vocab()`` locates the merges file shipped in the ``open_clip_torch`` wheel
through package metadata, without importing open_clip; ``load_tokenizer`` tries every source
in turn (files beside the weights, the wheel, the hub).
"""
from __future__ import annotations

import gzip
import html
import json
import os
import unicodedata
from functools import lru_cache
from pathlib import Path

from biomedseg.errors import WeightsMissingError

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
CONTEXT_LENGTH = 77
#: OpenAI CLIP uses the first 48894 merges of the 16e6 file (49152 - 256 - 2).
N_MERGES = 49152 - 256 - 2
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def basic_clean(text: str) -> str:
    """CLIP's cleaning minus ftfy: NFC normalisation, HTML unescaped twice, whitespace collapsed, lower case."""
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).strip().lower()


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch).startswith("N")


def pre_tokenize(text: str) -> list[str]:
    """Split like CLIP's pattern ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``.

    A hand-written scanner with the same leftmost-alternative semantics, using Unicode
    categories, so the third-party ``regex`` module is not needed.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        special = next((s for s in (SOT, EOT) if text.startswith(s, i)), None)
        if special is not None:
            out.append(special)
            i += len(special)
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if contraction is not None:
            out.append(contraction)
            i += len(contraction)
            continue
        if _is_letter(ch):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
        elif _is_number(ch):
            j = i + 1
        elif not ch.isspace():
            j = i + 1
            while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        else:
            i += 1
            continue
        out.append(text[i:j])
        i = j
    return out


def find_bpe_vocab() -> Path:
    """Path of a CLIP merges file already on this machine (env var, then the open_clip wheel's data)."""
    env = os.environ.get("BIOMEDSEG_CLIP_BPE")
    if env and Path(env).is_file():
        return Path(env)
    from importlib import metadata

    for dist in ("open_clip_torch", "open-clip-torch"):
        try:
            files = metadata.files(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for f in files:
            if str(f).endswith("bpe_simple_vocab_16e6.txt.gz"):
                path = Path(f.locate())
                if path.is_file():
                    return path
    raise FileNotFoundError(
        "CLIP BPE vocabulary not found: set BIOMEDSEG_CLIP_BPE to bpe_simple_vocab_16e6.txt.gz, "
        "install the open_clip_torch wheel (pip install open_clip_torch --no-deps), or pass "
        "vocab.json/merges.txt from openai/clip-vit-base-patch32")


def _read_merges_16e6(path: Path) -> list[tuple[str, str]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1:N_MERGES + 1]]


class ClipTokenizer:
    """Text -> (input_ids, attention_mask), both [N, 77] int64, exactly as CLIPTokenizer(padding='max_length')."""

    def __init__(self, bpe_path: str | os.PathLike | None = None, *, vocab_json: str | os.PathLike | None = None,
                 merges_txt: str | os.PathLike | None = None, context_length: int = CONTEXT_LENGTH):
        self.byte_encoder = bytes_to_unicode()
        if vocab_json is not None:
            self.encoder = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        else:
            merges = _read_merges_16e6(Path(bpe_path) if bpe_path else find_bpe_vocab())
            vocab = list(self.byte_encoder.values())
            vocab += [v + "</w>" for v in vocab]
            vocab += ["".join(m) for m in merges]
            vocab += [SOT, EOT]
            self.encoder = {v: i for i, v in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self.context_length = context_length
        self._cache = {SOT: SOT, EOT: EOT}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, token: str) -> str:
        """Merge the characters of one pre-token by rank; the last symbol carries '</w>'."""
        if token in self._cache:
            return self._cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[k], word[k + 1]) for k in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            k = 0
            while k < len(word):
                if k < len(word) - 1 and word[k] == first and word[k + 1] == second:
                    merged.append(first + second)
                    k += 2
                else:
                    merged.append(word[k])
                    k += 1
            word = merged
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT."""
        ids: list[int] = []
        for token in pre_tokenize(basic_clean(text)):
            if token in (SOT, EOT):
                ids.append(self.encoder[token])
                continue
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder.get(piece, self.eot_id) for piece in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | list[str]):
        """Tokenise, truncate to 75 BPE tokens, add SOT/EOT, pad with EOT to the context length."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        n = self.context_length
        ids = torch.full((len(texts), n), self.eot_id, dtype=torch.int64)
        mask = torch.zeros((len(texts), n), dtype=torch.int64)
        for row, text in enumerate(texts):
            toks = [self.sot_id] + self.encode(text)[: n - 2] + [self.eot_id]
            ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.int64)
            mask[row, : len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask}


TOKENIZER_SPEC = {"source": "hub", "repo": "openai/clip-vit-base-patch32", "files": ["vocab.json", "merges.txt"],
                  "revision": "main", "license": "MIT", "gated": False}


def load_tokenizer(folders=(), offline: bool | None = None):
    """CLIP tokenizer: vocab.json + merges.txt in ``folders`` (e.g. beside the weights), else the
    merges file of the open_clip wheel (or $BIOMEDSEG_CLIP_BPE), else ``openai/clip-vit-base-patch32``
    from $BIOMEDSEG_WEIGHTS_DIR, the hub cache or the hub."""
    from biomedseg.runtime.weights import resolve_weights

    for folder in folders:
        vocab, merges = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return ClipTokenizer(vocab_json=vocab, merges_txt=merges)
    try:
        return ClipTokenizer(find_bpe_vocab())
    except FileNotFoundError:
        pass
    try:
        vocab, merges = resolve_weights(TOKENIZER_SPEC, offline=offline)
    except WeightsMissingError as exc:
        raise WeightsMissingError(
            "BiomedParse needs the CLIP tokenizer vocabulary (vocab.json and merges.txt of "
            f"openai/clip-vit-base-patch32), and none was found: {exc.message}",
            hint="Put vocab.json and merges.txt beside the weights file, install the open_clip_torch wheel "
                 "(pip install open_clip_torch --no-deps), or go online once.") from None
    return ClipTokenizer(vocab_json=vocab, merges_txt=merges)
