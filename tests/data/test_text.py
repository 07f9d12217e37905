"""Tokenizers, the train/val split and the batch windows against the text they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.data.text import ByteTokenizer, StreamDecoder, load_tokenizer, prepare_text_data

TEXT = "Première ligne — ünïcode.\n" + "".join(
    f"To be or not {i}, that is the question.\n" for i in range(200))


def test_byte_tokenizer_is_utf8():
    tok = ByteTokenizer()
    assert tok.encode("é!") == [0xC3, 0xA9, 0x21]
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_split_and_windows_come_from_the_text(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(TEXT, encoding="utf-8")
    data = prepare_text_data(src, tmp_path / "cache", "byte", val_fraction=0.25)
    cut = int(len(TEXT) * 0.75)
    assert bytes(data.train.tolist()) == TEXT[:cut].encode("utf-8")
    assert bytes(data.val.tolist()) == TEXT[cut:].encode("utf-8")
    assert data.val_bytes == len(TEXT[cut:].encode("utf-8"))
    assert isinstance(data.train, np.memmap)

    x, y = data.get_batch("train", 5, 12, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 12) and x.dtype == torch.int64
    train_bytes = TEXT[:cut].encode("utf-8")
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        assert bytes(row_x[1:]) == bytes(row_y[:-1])  # y is x shifted by one
        assert bytes(row_x + row_y[-1:]) in train_bytes  # a contiguous window of the training text
    again = data.get_batch("train", 5, 12, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x)

    windows = list(data.sequential_batches("val", 4, 10))
    covered = sum(b[0].numel() for b in windows)
    assert covered == (len(data.val) - 1) // 10 * 10
    assert bytes(windows[0][0][0].tolist()) == TEXT[cut:].encode("utf-8")[:10]


def test_bpe_is_trained_saved_and_reloaded(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(TEXT, encoding="utf-8")
    data = prepare_text_data(src, tmp_path / "cache", "bpe", bpe_vocab_size=300, val_fraction=0.2)
    tok = load_tokenizer(tmp_path / "cache")
    assert tok.kind == "bpe" and 256 < tok.vocab_size <= 300
    cut = int(len(TEXT) * 0.8)
    assert tok.decode(data.train.tolist()) == TEXT[:cut]
    assert len(data.train) < len(TEXT[:cut].encode("utf-8"))  # merges compress the text


def test_stream_decoder_never_splits_a_character():
    tok = ByteTokenizer()
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode("aé—b")]
    assert pieces[1] == "" and "".join(pieces) == "aé—b"


def test_missing_source_and_too_short_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_text_data(tmp_path / "none.txt", tmp_path / "cache")
    src = tmp_path / "t.txt"
    src.write_text("short text here")
    data = prepare_text_data(src, tmp_path / "c2", val_fraction=0.5)
    with pytest.raises(ValueError, match="fewer than block_size"):
        data.get_batch("val", 2, 64, torch.Generator())
