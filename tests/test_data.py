import json

import pytest
import torch

from dms_llm.data import DataError, calibration_windows, load_text, tokenize_text


class CharTokenizer:
    """One token per character (ids < 128), enough to test windowing without a real tokenizer."""

    def __call__(self, text, add_special_tokens=True):
        class Out:
            input_ids = [min(ord(c), 127) for c in text]

        return Out()


def test_local_text_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\r\n")
    assert load_text(tmp_path / "a.txt") == "line one\nline two\n"  # CRLF never leaks into tokens
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "alpha"}) + "\n" + json.dumps({"text": "beta"}) + "\n")
    assert load_text(tmp_path / "b.jsonl") == "alpha\n\nbeta"
    folder_text = load_text(tmp_path)
    assert "line one" in folder_text and "beta" in folder_text


def test_builtin_pydoc_parts_are_disjoint():
    calib, held = load_text("pydoc"), load_text("pydoc-heldout")
    assert len(calib) > 100_000 and len(held) > 20_000
    assert held[:2000] not in calib


@pytest.mark.parametrize(
    "content,match",
    [(b"", "empty"), (b"   \n\n", "empty"), (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\xfa text", "UTF-8")],
)
def test_unusable_files(tmp_path, content, match):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_text(path)


def test_bad_jsonl_and_unknown_sources(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(DataError, match='"text"'):
        load_text(tmp_path / "x.jsonl")
    (tmp_path / "y.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        load_text(tmp_path / "y.jsonl")
    with pytest.raises(DataError, match="neither an existing file"):
        load_text("no-such-dataset-or-file")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_text(tmp_path / "empty_dir")


def test_calibration_windows_are_seeded_and_checked(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(chr(33 + (i * 7919) % 90) for i in range(1000)))  # not periodic in 50
    tok = CharTokenizer()
    w = calibration_windows(tok, path, seq_len=50, num_samples=5, seed=1)
    assert w.shape == (5, 50) and w.dtype == torch.long
    assert torch.equal(w, calibration_windows(tok, path, 50, 5, seed=1))
    assert not torch.equal(w, calibration_windows(tok, path, 50, 5, seed=2))
    with pytest.raises(DataError, match="Lower --num-samples"):
        calibration_windows(tok, path, seq_len=500, num_samples=5)


def test_held_out_windows_share_no_token_with_the_calibration_windows(tmp_path):
    from dms_llm.data import held_out_windows

    path = tmp_path / "t.txt"
    codes = torch.randint(0, 90, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    path.write_text("".join(chr(33 + c) for c in codes))
    tok = CharTokenizer()
    ids = tokenize_text(tok, path.read_text())
    calib = calibration_windows(tok, path, seq_len=50, num_samples=5, seed=1)

    def spans(windows):  # where each window lies in the text (the text is random: each window occurs once)
        starts = [next(k for k in range(len(ids) - w.numel() + 1) if torch.equal(ids[k:k + w.numel()], w))
                  for w in windows]
        return [set(range(k, k + windows.shape[1])) for k in starts]

    taken = set().union(*spans(calib))
    for length in (50, 200):
        held = held_out_windows(tok, path, 50, 5, 4, seed=1, length=length)
        assert held.shape == (4, length)
        assert all(not (span & taken) for span in spans(held))
    assert torch.equal(calib, calibration_windows(tok, path, 50, 5, seed=1))  # unchanged by the held-out draw
    assert len(held_out_windows(tok, path, 50, 5, 100, seed=1, length=200)) < 10  # only the free ones
    assert held_out_windows(tok, path, 50, 40, 4, seed=1, length=2000) is None  # none free
    assert held_out_windows(tok, path, 50, 5, 0, seed=1) is None


def test_big_local_corpora_are_read_only_as_far_as_needed(tmp_path, monkeypatch):
    """Calibration never reads a large file whole: text files stop at the character cap, JSONL is streamed (a
    broken line after the cap is never parsed), folders stop at the first files that fill the cap."""
    import dms_llm.data as data_mod

    big = tmp_path / "big.txt"
    big.write_text("word " * 1_000_000)  # 5M characters
    seen = {}
    real_tokenize = data_mod.tokenize_text

    def tokenize(tokenizer, text, **kw):
        seen["chars"] = len(text)
        return real_tokenize(tokenizer, text, **kw)

    monkeypatch.setattr(data_mod, "tokenize_text", tokenize)
    windows = calibration_windows(CharTokenizer(), big, seq_len=16, num_samples=4)
    assert windows.shape == (4, 16) and seen["chars"] == 2_000_000
    lines = [json.dumps({"text": "x" * 1000})] * 3000 + ["{ not json"]
    (tmp_path / "big.jsonl").write_text("\n".join(lines))
    assert len(load_text(tmp_path / "big.jsonl", max_chars=100_000)) < 110_000
    with pytest.raises(DataError, match="line 3001 is not valid JSON"):
        load_text(tmp_path / "big.jsonl")
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"shard{i} " * 50_000)
    (folder / "3.txt").write_bytes(b"\x00binary")  # never reached
    text = load_text(folder, max_chars=500_000)
    assert "shard1" in text and "shard2" not in text
