import json

import pytest
import torch

from dms_llm.data import DataError, calibration_windows, load_text


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
