"""Publishing: the exact folder and card that would be uploaded, a portable per-layer checkpoint (no dms-llm on
the loading side; peft LoRA applies), and the upload's failure modes (no token, failed upload) without network."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from dms_llm import cli, hub
from dms_llm.hub import PushError, files_to_upload, push, stage

TOKEN = "hf_secretTOKEN1234567890"


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_staged_folder_is_complete_and_the_card_names_the_repo(pruned_folder, tmp_path):
    info = json.loads((pruned_folder / "dms_structure.json").read_text())
    info["perplexity"] = {"dense": {"ppl": 10.0, "windows": 4, "seq_len": 64, "data": "wikitext2"},
                          "pruned": {"ppl": 12.5, "windows": 4, "seq_len": 64, "data": "wiki.test.raw"}}
    (pruned_folder / "dms_structure.json").write_text(json.dumps(info))
    (pruned_folder / ".dms-search-state.pt").write_text("not for upload")
    staged = stage(pruned_folder, "someone/tiny-dms", tmp_path / "staged")
    names = sorted(p.name for p in staged.iterdir())
    assert names == sorted(files_to_upload(pruned_folder) + ["README.md"])
    assert {"model.safetensors", "config.json", "configuration_dms_llama.py", "modeling_dms_llama.py",
            "tokenizer.json", "dms_structure.json", "dms_structure.png", "README.md"} <= set(names)
    assert not any(n.startswith(".") for n in names)
    card = (staged / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == "example-org/tiny-llama"
    assert {"pruned", "dms"} <= set(meta["tags"]) and meta["datasets"] == ["Salesforce/wikitext"]
    metrics = meta["model-index"][0]["results"][0]
    assert metrics["metrics"][0]["type"] == "perplexity" and metrics["metrics"][0]["value"] == 12.5
    assert metrics["dataset"]["type"] == "Salesforce/wikitext"
    assert 'path = "someone/tiny-dms"' in card and "trust_remote_code=True" in card
    assert "![kept structure per layer](dms_structure.png)" in card and "dms-llm prune" in card
    # the staged per-layer checkpoint reloads from that folder alone
    reloaded = AutoModelForCausalLM.from_pretrained(staged, trust_remote_code=True)
    original = AutoModelForCausalLM.from_pretrained(pruned_folder, trust_remote_code=True)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, original(ids).logits)
    # staging did not touch the export
    assert (pruned_folder / ".dms-search-state.pt").exists()
    assert (pruned_folder / "README.md").read_text() != card


PORTABLE = textwrap.dedent('''
    import importlib.abc, sys
    class NoDmsLlm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "dms_llm":
                raise ImportError("dms_llm is not installed on this machine")
    sys.meta_path.insert(0, NoDmsLlm())
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    folder, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    lora_layers = sum("lora_A" in n for n, _ in lora.named_parameters())
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad()
    with torch.no_grad():
        adapted = lora(ids).logits
    merged = lora.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(ids).logits
    assert not any(m.split(".")[0] == "dms_llm" for m in sys.modules)
    torch.save({"logits": logits, "adapted": adapted, "merged": merged_logits,
                "lora_layers": lora_layers}, out)
''')


def test_per_layer_checkpoint_is_portable_and_takes_lora(pruned_folder, tmp_path):
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(pruned_folder, copy)  # a plain folder copy, as after a download
    script = tmp_path / "load.py"
    script.write_text(PORTABLE)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(copy), str(tmp_path / "r.pt")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = torch.load(tmp_path / "r.pt")
    original = AutoModelForCausalLM.from_pretrained(pruned_folder, trust_remote_code=True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(r["logits"], original(ids).logits, atol=1e-5)
    # 4 layers: 3 with attention (q_proj, v_proj), 3 with an MLP (up_proj, down_proj)
    assert r["lora_layers"] == 3 * 2 + 3 * 2
    assert not torch.allclose(r["adapted"], r["logits"], atol=1e-4)  # the adapters trained
    assert torch.allclose(r["merged"], r["adapted"], atol=1e-4)  # and merge into the per-layer weights


def test_push_without_token_says_how_to_log_in(pruned_folder, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PushError, match="hf auth login.*HF_TOKEN"):
        push(pruned_folder, "someone/tiny-dms")


class FakeApi:
    calls: list = []
    messages: list = []
    fail_upload = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None):
        files = sorted(p.name for p in folder_path.iterdir())
        card = (folder_path / "README.md").read_text()
        self.calls.append(("upload_folder", repo_id, files, card, self.token))
        self.messages.append(commit_message)
        if self.fail_upload:
            raise OSError(f"connection reset while sending with Authorization: Bearer {self.token}")


@pytest.fixture
def fake_hub(monkeypatch):
    FakeApi.calls, FakeApi.messages, FakeApi.fail_upload = [], [], False
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return FakeApi


def test_push_command_uploads_the_staged_folder_and_never_prints_the_token(pruned_folder, fake_hub, capsys, caplog):
    assert cli.main(["push", str(pruned_folder), "--repo", "someone/tiny-dms", "--private",
                     "--message", "first upload"]) == 0
    (_, repo, private), (_, _, files, card, token) = fake_hub.calls
    assert fake_hub.messages == ["first upload"]
    assert repo == "someone/tiny-dms" and private and token == TOKEN
    assert files == sorted(files_to_upload(pruned_folder) + ["README.md"])
    assert 'path = "someone/tiny-dms"' in card
    out = capsys.readouterr()
    assert "https://huggingface.co/someone/tiny-dms" in out.out
    assert TOKEN not in out.out + out.err + caplog.text


def test_failed_upload_keeps_the_folder_and_hides_the_token(pruned_folder, fake_hub, capsys, caplog):
    fake_hub.fail_upload = True
    before = sorted((p.name, p.stat().st_mtime_ns) for p in pruned_folder.iterdir())
    assert cli.main(["push", str(pruned_folder), "--repo", "someone/tiny-dms"]) == 2
    err = capsys.readouterr().err
    assert "upload of" in err and "failed" in err and "unchanged" in err and "dms-llm push" in err
    assert TOKEN not in err + caplog.text and "***" in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in pruned_folder.iterdir()) == before


@pytest.mark.parametrize("broken, message", [
    ("model.safetensors", "missing \\*.safetensors"),
    ("modeling_dms_llama.py", "missing modeling_dms_llama.py"),
    ("dms_structure.png", "missing dms_structure.png"),
])
def test_incomplete_export_is_refused_before_any_upload(pruned_folder, fake_hub, broken, message):
    (pruned_folder / broken).unlink()
    with pytest.raises(PushError, match=message):
        push(pruned_folder, "someone/tiny-dms")
    assert fake_hub.calls == []


def test_bad_repo_id_is_refused(pruned_folder, fake_hub, tmp_path):
    for repo in ("no-owner", "a/b/c", "bad name/x"):
        with pytest.raises(PushError, match="repo"):
            hub.stage(pruned_folder, repo, tmp_path / repo.replace("/", "_"))
    assert fake_hub.calls == []


def test_dry_run_lists_what_would_be_uploaded(pruned_folder, tmp_path, capsys):
    assert cli.main(["push", str(pruned_folder), "--repo", "someone/tiny-dms", "--dry-run", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "would upload to someone/tiny-dms" in out and "modeling_dms_llama.py" in out and "README.md" in out


def test_push_help_documents_the_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["push", "--help"])
    text = capsys.readouterr().out
    assert "--repo" in text and "--private" in text and "HF_TOKEN" in text and "never printed" in text


def test_prune_push_to_hub_uploads_the_verified_export(dense_folder, text_file, tmp_path, fake_hub, capsys):
    out = tmp_path / "pushed"
    assert cli.main(["prune", str(dense_folder), "--keep", "0.7", "--steps", "3", "--seq-len", "32",
                     "--num-samples", "4", "--calib", str(text_file), "--no-eval", "--quiet", "--out", str(out),
                     "--push-to-hub", "someone/tiny-dms"]) == 0
    (_, repo, private), (_, _, files, card, _) = fake_hub.calls
    assert repo == "someone/tiny-dms" and not private and "model.safetensors" in files and "README.md" in files
    assert 'path = "someone/tiny-dms"' in card and (out / "model.safetensors").exists()
    assert TOKEN not in capsys.readouterr().out


def test_the_card_says_whether_the_reconstruction_was_kept(pruned_folder):
    from dms_llm.card import render_model_card

    info = json.loads((pruned_folder / "dms_structure.json").read_text())
    check = {"windows": 8, "sliced": 1.0, "repaired": 0.5, "kept": "repaired"}
    info["reconstruction"] = {"tokens": 8192, "check": check}
    assert "refit by least squares on 8,192 calibration tokens" in render_model_card(info)
    info["reconstruction"]["check"] = {**check, "repaired": 2.0, "kept": "sliced"}
    card = render_model_card(info)
    assert "refit by least squares" not in card and "reconstruction was tried and undone" in card


def test_the_cards_load_lines_run_silently_where_dms_llm_is_not_installed(pruned_folder, tmp_path):
    """The card's "Load" block, as written, in a terminal (transformers asks about custom code only there), from a
    copy of the folder without dms-llm: no question about running code, no warning about model types."""
    import pty
    import select

    card = (pruned_folder / "README.md").read_text()
    block = card.split("## Load")[1].split("```python\n")[1].split("```")[0]
    assert "AutoTokenizer.from_pretrained(path, trust_remote_code=True)" in block
    copy = shutil.copytree(pruned_folder, tmp_path / "elsewhere" / "model")
    code = ("import importlib.abc, sys\n"
            "class NoDmsLlm(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'dms_llm':\n"
            "            raise ImportError('dms_llm is not installed on this machine')\n"
            "sys.meta_path.insert(0, NoDmsLlm())\n"
            + block + "print('LOADED', type(model).__name__, type(tokenizer).__name__)\n")
    master, slave = pty.openpty()
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, cwd=copy, env=env)
    os.close(slave)
    output = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    proc.wait(timeout=60)
    os.close(master)
    text = output.decode(errors="replace")
    assert proc.returncode == 0 and "LOADED DMSLlamaForCausalLM" in text, text[-3000:]
    assert "Do you wish to run the custom code" not in text and "You are using a model of type" not in text, text
