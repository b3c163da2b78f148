"""vLLM plugin (``pip install "dms-llm[vllm]"``): ``vllm serve FOLDER`` and ``vllm.LLM(FOLDER)`` run dms-llm's
per-layer exports (``DMSLlamaForCausalLM``: each layer its own query / KV heads and MLP width, removed attention
and MLP blocks absent) with vLLM's own layers, without ``trust_remote_code``.

vLLM calls :func:`register` in each of its processes through the ``vllm.general_plugins`` entry point; it registers
the export's config class with transformers and the model class (``dms_llm.vllm_model``) with vLLM. This module
imports no vLLM code, so the structure checks below also run (and are tested) without vLLM.
"""

from __future__ import annotations

from .structure import splits_across

ARCHITECTURE = "DMSLlamaForCausalLM"
MODEL_CLASS = "dms_llm.vllm_model:DMSLlamaForCausalLM"

# DMSLlamaConfig features the plugin's layers do not compute yet (Gemma 3's), with what each one is
UNSUPPORTED_FEATURES = {
    "sandwich_norms": "Gemma 3's norms after each block",
    "norm_unit_offset": "Gemma's RMSNorm (1 + weight)",
    "embed_scale": "a scaled token embedding",
    "query_pre_attn_scalar": "an attention scale other than head_dim ** -0.5",
    "final_logit_softcapping": "logit soft-capping",
}


def register() -> None:
    """Make vLLM find the per-layer export: its config class for transformers' ``AutoConfig`` (so no
    ``trust_remote_code`` is needed) and its model class for vLLM's ``ModelRegistry``."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .modeling.configuration_dms_llama import DMSLlamaConfig

    try:
        AutoConfig.register(DMSLlamaConfig.model_type, DMSLlamaConfig)
    except ValueError:  # registered already (a second call in this process)
        pass
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def check_servable(config) -> None:
    """ValueError naming what vLLM's layers would miss when the per-layer export ``config`` uses a feature the
    plugin does not build (Gemma 3's), or an activation other than SiLU."""
    missing = [what for name, what in UNSUPPORTED_FEATURES.items() if getattr(config, name, None)]
    rope = getattr(config, "rope_parameters", None) or {}
    if any(isinstance(rope.get(t), dict) for t in ("full_attention", "sliding_attention")):
        missing.append("a rotary embedding per layer type")
    if getattr(config, "hidden_act", "silu") != "silu":
        missing.append(f"the {config.hidden_act} activation (vLLM's Llama MLP computes SiLU)")
    if missing:
        family = getattr(config, "source_model_type", "?")
        raise ValueError(
            f"dms-llm's vLLM plugin serves per-layer exports of Llama, Mistral, Qwen2 and Qwen3; this one "
            f"(source_model_type={family!r}) needs {', '.join(missing)}, which the plugin does not build. Export "
            f"with `--format uniform` (a stock checkpoint vLLM serves as is) or serve it with transformers.")


def tensor_parallel_sizes(config, limit: int = 64) -> list[int]:
    """The tensor-parallel sizes up to ``limit`` that split every layer of the per-layer export ``config``: each
    layer's query heads and MLP width divide by it, and its KV heads divide by it or it by them (vLLM replicates KV
    heads when there are fewer than GPUs)."""
    return [tp for tp in range(1, limit + 1) if config.hidden_size % tp == 0 and not _unsplit_layers(config, tp)]


def check_tensor_parallel(config, tp: int) -> None:
    """ValueError naming the layers in the way and the sizes that work when tensor parallelism of size ``tp``
    cannot split ``config``."""
    bad = _unsplit_layers(config, tp)
    if bad:
        sizes = tensor_parallel_sizes(config, limit=max(tp, 8))
        raise ValueError(
            f"tensor parallel size {tp} cannot split this per-layer model: layers {bad[:8]}"
            f"{' ...' if len(bad) > 8 else ''} have query heads, KV heads or an MLP width it does not divide. "
            f"Sizes that work: {', '.join(map(str, sizes))}; or prune again with `--tensor-parallel {tp}`, which "
            f"rounds every layer's widths to what {tp} GPUs split.")


def _unsplit_layers(config, tp: int) -> list[int]:
    group = config.num_attention_heads // config.num_key_value_heads
    return [i for i, (kv, width) in enumerate(zip(config.layer_num_key_value_heads, config.layer_intermediate_sizes))
            if not splits_across(tp, kv, group, width)]
