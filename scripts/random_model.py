"""Write a randomly initialised model folder of one of benchmark_scale's shapes (or ``tiny-262k``: a 4-layer Llama,
hidden 64, with Gemma 3's 262,144-token vocabulary; or ``qwen3-0.6b``: Qwen3-0.6B's config), with the embedded
SmolLM2's tokenizer, so that `dms-llm prune` can be timed (and its GGUF checked) on it as a user runs it:

    python scripts/random_model.py gemma3-270m /tmp/gemma3-270m-random
    /usr/bin/time -v dms-llm prune /tmp/gemma3-270m-random --keep 0.8 --steps 100 --num-samples 32 --no-eval --out x

Token ids come from the 49,152-token SmolLM2 vocabulary, all valid in the larger ones; the weights are random, so
only cost (time, memory) means anything here.
"""

import argparse

import torch
from benchmark_scale import SHAPES  # a sibling module of this script
from transformers import AutoConfig, AutoModelForCausalLM

from dms_llm.loading import load_model

# Qwen3-0.6B's config
QWEN3_06B = dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY_262K = dict(model_type="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=262144, tie_word_embeddings=True, max_position_embeddings=2048)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted([*SHAPES, "tiny-262k", "qwen3-0.6b"]))
    parser.add_argument("out")
    args = parser.parse_args()
    _, tokenizer, _ = load_model("smollm2-135m")
    values = dict({"tiny-262k": TINY_262K, "qwen3-0.6b": QWEN3_06B}.get(args.shape) or SHAPES[args.shape])
    config = AutoConfig.for_model(values.pop("model_type"), **values, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters -> {args.out}")


if __name__ == "__main__":
    main()
