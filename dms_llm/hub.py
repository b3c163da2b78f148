"""Publish an export to the Hugging Face Hub: stage exactly the files to upload (with a card that names the repo),
then upload them with ``huggingface_hub``. The local export is never changed, and the token is never printed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DMSError

logger = logging.getLogger("dms_llm")

CODE_FILES = ("configuration_dms_llama.py", "modeling_dms_llama.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
ALWAYS = ("config.json", "dms_structure.json", "dms_structure.png")
OPTIONAL = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "merges.txt",
            "added_tokens.json", "chat_template.jinja", "dms_search_log.jsonl", "dms_recovery_log.jsonl",
            "model.safetensors.index.json")


class PushError(DMSError, RuntimeError):
    """The export cannot be published, or the upload failed."""


def files_to_upload(folder: str | Path) -> list[str]:
    """The files of an export that belong on the Hub; raises :class:`PushError` naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder; give the output folder of `dms-llm prune` or `dms-llm finetune`")
    names = {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    missing = [n for n in ALWAYS if n not in names]
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    if not weights:
        missing.append("*.safetensors (weights)")
    if not any(n in names for n in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    config = json.loads((folder / "config.json").read_text()) if "config.json" in names else {}
    if config.get("auto_map"):
        missing += [n for n in CODE_FILES if n not in names]
    if missing:
        raise PushError(
            f"{folder} is not a complete dms-llm export: missing {', '.join(missing)}. Publish the folder written by "
            f"`dms-llm prune` / `dms-llm finetune` (or export it again)"
        )
    keep = set(ALWAYS) | set(weights) | {n for n in names if n in OPTIONAL or n in TOKENIZER_FILES}
    keep |= {n for n in CODE_FILES if n in names}
    return sorted(keep)


def stage(folder: str | Path, repo_id: str, staging_dir: str | Path) -> Path:
    """Build in ``staging_dir`` exactly the folder that :func:`push` uploads: the export's files (hard links where
    possible) and a model card rendered for ``repo_id``. ``folder`` is not changed."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .card import render_model_card
    from .folder import load_structure_file

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"invalid repo id {repo_id!r}: {e}. Use USER/NAME or ORG/NAME") from None
    if "/" not in repo_id:
        raise PushError(f"give the repo as USER/NAME or ORG/NAME, not {repo_id!r}")
    folder, staging = Path(folder).resolve(), Path(staging_dir)
    names = files_to_upload(folder)
    staging.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = folder / name, staging / name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    info = load_structure_file(folder)
    (staging / "README.md").write_text(render_model_card(info, repo_id=repo_id))
    return staging


def push(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str | None = None) -> str:
    """Upload the export ``folder`` to the Hub model repo ``repo_id`` (created if needed); returns its URL.

    The token is ``token``, else the usual ``HF_TOKEN`` / ``hf auth login``; it is never printed or logged."""
    from huggingface_hub import HfApi, get_token

    with tempfile.TemporaryDirectory(prefix=".dms-push-") as tmp:
        staged = stage(folder, repo_id, Path(tmp) / "upload")  # refuses an incomplete export or a bad repo id
        token = token or get_token()
        if not token:
            raise PushError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, then push again "
                            f"with `dms-llm push {folder} --repo {repo_id}`")
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(folder_path=staged, repo_id=repo_id, repo_type="model",
                              commit_message=commit_message or "Upload model pruned with dms-llm")
        except Exception as e:  # network, auth, quota: say what failed, keep the secret out of the message
            message = str(e).replace(token, "***")
            raise PushError(
                f"upload of {folder} to {repo_id} failed ({type(e).__name__}: {message}). The local folder is "
                f"unchanged; retry with `dms-llm push {folder} --repo {repo_id}`"
            ) from None
    logger.info("pushed %s to %s", folder, url)
    return str(url)
