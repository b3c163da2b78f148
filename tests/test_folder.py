"""Output folders: written beside the target and moved into place, never half-written, never over the source."""

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import dms_llm.exporter as export_mod
import dms_llm.folder as folder_mod
from dms_llm.exporter import ExportError, export
from dms_llm.structure import ModelShape, Structure

from .conftest import tiny_llama


def test_full_disk_during_export_leaves_old_output(gqa_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    s = Structure.dense(ModelShape.from_model(gqa_model))
    real_build = export_mod.build_pruned_model

    def build_then_fail_on_save(model, structure, atol=None):
        pruned = real_build(model, structure, atol)

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        pruned.save_pretrained = no_space
        return pruned

    monkeypatch.setattr(export_mod, "build_pruned_model", build_then_fail_on_save)
    with pytest.raises(ExportError, match="No space left.*free disk space"):
        export(gqa_model, s, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "previous"


def test_read_only_output_is_refused_before_work(gqa_model, tmp_path, monkeypatch):
    monkeypatch.setattr(folder_mod.os, "access", lambda path, mode: False)  # root ignores chmod; simulate
    with pytest.raises(ExportError, match="read-only"):
        folder_mod.check_output_dir(tmp_path / "new" / "out", None, False)


EXPORT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama
    import dms_llm.exporter as exporter
    import dms_llm.folder as folder
    from dms_llm.structure import ModelShape, Structure
    model = tiny_llama()
    real_verify = folder._verify
    def slow_verify(*args, **kwargs):
        print("writing", flush=True)
        time.sleep(60)
        return real_verify(*args, **kwargs)
    folder._verify = slow_verify
    exporter.export(model, Structure.dense(ModelShape.from_model(model)), sys.argv[1], overwrite=True)
    """
)


def test_sigkilled_export_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    script = tmp_path / "export.py"
    script.write_text(EXPORT.format(tests=os.path.dirname(__file__)))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"  # weights written to the temporary folder, not yet verified
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    stale = list(tmp_path.glob(".out.tmp-*"))
    assert len(stale) == 1 and (stale[0] / "model.safetensors").exists()  # beside the target, never in it
    # the next export into the same place cleans up what the killed one left
    model = tiny_llama()
    export(model, Structure.dense(ModelShape.from_model(model)), out, overwrite=True)
    assert not list(tmp_path.glob(".out.tmp-*")) and (out / "model.safetensors").exists()


def test_logit_check_tolerance_grows_with_the_logits_only_past_ten():
    from dms_llm.folder import check_same_logits

    big = torch.tensor([[40.0, -3.0]])
    assert check_same_logits(big, big + 2e-3, 1e-3, "x") == pytest.approx(2e-3, rel=1e-3)  # 1e-3 x 40 / 10
    with pytest.raises(ExportError, match="max abs logit diff"):
        check_same_logits(big, big + 0.1, 1e-3, "x")
    small = torch.tensor([[5.0, -3.0]])
    with pytest.raises(ExportError, match="max abs logit diff"):
        check_same_logits(small, small + 2e-3, 1e-3, "x")


def test_a_gguf_input_protects_the_file_not_the_folder_beside_it(tmp_path):
    """`dms-llm prune model.gguf --out pruned`, run in the folder that holds model.gguf, writes pruned/ there."""
    from dms_llm.folder import check_output_dir
    from dms_llm.loading import resolve_source

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    _, name, protected = resolve_source(str(gguf))
    assert name == "model.gguf" and protected == gguf.resolve()
    assert check_output_dir(tmp_path / "pruned", protected, overwrite=False) == (tmp_path / "pruned").resolve()
    with pytest.raises(ExportError, match="contains the source model"):
        check_output_dir(tmp_path, protected, overwrite=True)  # replacing the folder would delete the input
    with pytest.raises(ExportError, match="source file"):
        check_output_dir(gguf, protected, overwrite=True)
