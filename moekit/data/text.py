"""Text for language models: tokenizers, token ids in memory-mapped files, random training windows.

Byte-level tokenization is the default: no vocabulary to fetch or train, and every input is valid.
A byte-level BPE vocabulary can be trained locally with the `tokenizers` library instead; it is
saved as `tokenizer.json` beside the token files and the checkpoints.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moekit.io import atomic_write_bytes, atomic_write_json


class ByteTokenizer:
    """UTF-8 bytes are the tokens: vocab_size 256."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, folder: str | os.PathLike) -> None:
        atomic_write_json(Path(folder) / "tokenizer.json", {"kind": "byte"})


class BPETokenizer:
    """A byte-level BPE vocabulary from the `tokenizers` library (GPT-2 style pre-tokenization)."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, folder: str | os.PathLike) -> None:
        atomic_write_bytes(Path(folder) / "tokenizer.json", self._tok.to_str().encode("utf-8"))


def load_tokenizer(folder: str | os.PathLike) -> ByteTokenizer | BPETokenizer:
    """The tokenizer saved in `folder` (tokenizer.json); byte-level if the file says so."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("kind") == "byte":
        return ByteTokenizer()
    return BPETokenizer.load(path)


class StreamDecoder:
    """Turns a stream of token ids into text pieces that never split a UTF-8 character."""

    def __init__(self, tokenizer: ByteTokenizer | BPETokenizer) -> None:
        self.tokenizer = tokenizer
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._printed = 0

    def push(self, token_id: int) -> str:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self._bytes.decode(bytes([token_id]))
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        piece, self._printed = text[self._printed:], len(text)
        return piece


def text_files(path: str | os.PathLike) -> list[Path]:
    """The files a text source names: the file itself, or every *.txt / *.raw file of a folder in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".raw") and p.is_file())
        if not files:
            raise FileNotFoundError(f"no .txt or .raw files in {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"text data {path} does not exist")
    return [path]


def read_text_source(path: str | os.PathLike) -> str:
    """A text file (gzip-compressed if it ends in .gz), or every *.txt / *.raw file of a folder in name
    order, concatenated. Undecodable or empty input names the file (and the byte)."""
    parts = []
    for file in text_files(path):
        try:
            if file.suffix == ".gz":
                import gzip

                raw = gzip.decompress(file.read_bytes())
            else:
                raw = file.read_bytes()
        except (OSError, EOFError) as error:
            raise ValueError(f"text data {file} cannot be read: {error}") from None
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            bad = raw[error.start:error.start + 1]
            raise ValueError(f"text data {file} is not UTF-8 text (byte {error.start}: {bad!r}); "
                             "is it a binary file?") from None
    text = "".join(parts)
    if not text:
        raise ValueError(f"text data {path} is empty")
    return text


def fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 over the source's file names and bytes: the token cache is keyed by content, so an
    edited file, or a file added to a folder, is tokenized again."""
    import hashlib

    digest = hashlib.sha256()
    for file in text_files(path):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class TokenData:
    """Train and validation token ids (memory-mapped) and what they came from."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: ByteTokenizer | BPETokenizer
    val_bytes: int
    """UTF-8 bytes of the validation text, for bits per byte."""

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random contiguous windows: x (B, T) and y = x shifted by one, both int64."""
        ids = self.train if split == "train" else self.val
        if len(ids) <= block_size:
            raise ValueError(f"{split} split has {len(ids)} tokens, "
                             f"fewer than block_size + 1 = {block_size + 1}")
        starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator).tolist()
        window = np.stack([ids[s:s + block_size + 1] for s in starts]).astype(np.int64)
        xy = torch.from_numpy(window)
        return xy[:, :-1], xy[:, 1:]

    def sequential_batches(self, split: str, batch_size: int, block_size: int, max_tokens: int | None = None):
        """Consecutive non-overlapping windows from the split's start: a deterministic evaluation set."""
        ids = self.val if split == "val" else self.train
        n = (len(ids) - 1) // block_size
        if max_tokens:
            n = min(n, max(1, max_tokens // block_size))
        if n == 0:
            raise ValueError(f"{split} split has {len(ids)} tokens, "
                             f"fewer than block_size + 1 = {block_size + 1}")
        for first in range(0, n, batch_size):
            rows = range(first, min(first + batch_size, n))
            window = np.stack([ids[r * block_size:(r + 1) * block_size + 1] for r in rows]).astype(np.int64)
            xy = torch.from_numpy(window)
            yield xy[:, :-1], xy[:, 1:]


def prepare_text_data(source: str | os.PathLike, cache_dir: str | os.PathLike, tokenizer: str = "byte",
                      bpe_vocab_size: int = 4096, val_fraction: float = 0.1) -> TokenData:
    """Tokenize `source` once into `cache_dir/{train,val}.bin` (+ tokenizer.json, meta.json); reuse it after.

    The last `val_fraction` of the text (cut at a character) is the validation split, as is usual
    for TinyShakespeare. `tokenizer`: 'byte', 'bpe' (a byte-level BPE vocabulary trained on the
    training part only) or the path of a tokenizer.json (or of a folder holding one: an imported
    model's). The cache is keyed by the source's content (`fingerprint`) and the tokenizer; it says
    when it rebuilds.
    """
    if tokenizer not in ("byte", "bpe") and not Path(tokenizer).exists():
        raise ValueError(f"tokenizer must be 'byte', 'bpe' or the path of a tokenizer.json (got {tokenizer!r}: "
                         "no such file)")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1) (got {val_fraction})")
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "meta.json"
    tokenizer_file = None
    if tokenizer not in ("byte", "bpe"):
        tokenizer_file = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
    wanted = {"source": str(Path(source).resolve()), "content": fingerprint(source), "tokenizer": tokenizer,
              "tokenizer_content": tokenizer_file.read_text(encoding="utf-8") if tokenizer_file else None,
              "val_fraction": val_fraction, "bpe_vocab_size": bpe_vocab_size if tokenizer == "bpe" else None}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if all(meta.get(k) == v for k, v in wanted.items()):
            return _open_token_data(cache_dir, meta)
        print(f"moekit: tokenizing {source} again: the token cache in {cache_dir} was made from other text "
              "or another tokenizer", file=sys.stderr)

    text = read_text_source(source)
    cut = int(len(text) * (1 - val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    if tokenizer == "byte":
        tok: ByteTokenizer | BPETokenizer = ByteTokenizer()
    elif tokenizer == "bpe":
        tok = BPETokenizer.train([train_text], bpe_vocab_size)
    else:
        tok = load_tokenizer(tokenizer_file.parent)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train_text), ("val", val_text)):
        ids = np.asarray(tok.encode(part), dtype=dtype)
        if ids.size == 0:
            raise ValueError(f"text data {source}: the {name} split ({val_fraction:.0%} held out) encodes to no tokens")
        atomic_write_bytes(cache_dir / f"{name}.bin", ids.tobytes())
    tok.save(cache_dir)
    meta = {**wanted, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
            "val_bytes": len(val_text.encode("utf-8"))}
    atomic_write_json(meta_path, meta)
    return _open_token_data(cache_dir, meta)


def _open_token_data(cache_dir: Path, meta: dict) -> TokenData:
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(cache_dir / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(cache_dir / "val.bin", dtype=dtype, mode="r")
    return TokenData(train, val, load_tokenizer(cache_dir), int(meta["val_bytes"]))
