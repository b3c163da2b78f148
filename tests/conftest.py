import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(2)


def tiny_llama(num_kv_heads=2, num_heads=4, layers=4, tie=True, hidden=64, intermediate=96, bias=False, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, head_dim=hidden // num_heads,
    )
    model = LlamaForCausalLM(config).eval()
    # random init gives tiny norms/weights; spread them so masking has visible effects
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def gqa_model():
    return tiny_llama()


@pytest.fixture
def mha_model():
    return tiny_llama(num_kv_heads=4, tie=False, bias=True)


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (8, 32), generator=g)
