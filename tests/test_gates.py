import torch

from dms_llm.gates import DMSGates, hard_masked
from dms_llm.structure import ModelShape, Structure


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_removing_gates_restores_model_bit_for_bit(gqa_model, calib):
    ids = calib[:2]
    before = _logits(gqa_model, ids)
    state = {k: v.clone() for k, v in gqa_model.state_dict().items()}
    gates = DMSGates(gqa_model)
    with torch.no_grad():
        for op in gates.operators.values():
            op.ratio.fill_(0.5)
    gates.begin_step("soft")
    assert not torch.allclose(_logits(gqa_model, ids), before)
    gates.begin_step("off")
    assert torch.equal(_logits(gqa_model, ids), before)
    gates.begin_step("ones")
    assert torch.equal(_logits(gqa_model, ids), before)
    gates.remove()
    assert torch.equal(_logits(gqa_model, ids), before)
    assert all(torch.equal(v, state[k]) for k, v in gqa_model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in gqa_model.modules())


def test_soft_step_gives_mask_gradients_and_importance(gqa_model, calib):
    gates = DMSGates(gqa_model, mlp_unit=8)
    for p in gqa_model.parameters():
        p.requires_grad_(False)
    gates.begin_step("soft")
    loss = gqa_model(input_ids=calib[:2], labels=calib[:2]).loss
    loss.backward()
    grads = gates.mask_gradients()
    assert set(grads) == {"heads", "channels", "attn_depth", "mlp_depth"}
    assert grads["heads"][1].shape == (4, 2) and grads["channels"][1].shape == (4, 12)
    assert all(g.abs().sum() > 0 for _, g in grads.values())
    before = gates.operators["channels"].importance.clone()
    gates.update_importance()
    assert not torch.equal(before, gates.operators["channels"].importance)
    assert all(op.ratio.grad is not None for op in gates.operators.values())


def test_hard_masked_zero_group_equals_zeroing_its_weights(gqa_model, calib):
    """Removing KV group 1 by mask == zeroing its k/v rows and its query heads' o_proj columns."""
    shape = ModelShape.from_model(gqa_model)
    structure = Structure.dense(shape)
    structure.layers[2].kv_heads = [0]
    with hard_masked(gqa_model, structure):
        masked = _logits(gqa_model, calib[:1])
    d, r = shape.head_dim, shape.heads_per_group
    with torch.no_grad():
        gqa_model.model.layers[2].self_attn.o_proj.weight[:, r * d : 2 * r * d] = 0
    assert torch.allclose(_logits(gqa_model, calib[:1]), masked, atol=1e-6)


def test_uniform_gates_share_counts(gqa_model):
    gates = DMSGates(gqa_model, uniform=True, mlp_unit=8)
    assert set(gates.operators) == {"heads", "channels", "layer_depth"}
    with torch.no_grad():
        gates.operators["channels"].ratio.fill_(0.5)
        gates.operators["layer_depth"].ratio.fill_(0.25)
    s = gates.hard_structure()
    assert s.is_uniform() and len(s.kept_layers()) == 3
    assert set(s.intermediate_sizes()) == {0, 48}


def test_tensor_parallel_rounds_every_layers_widths_to_what_it_splits(mha_model):
    from dms_llm.structure import splits_across

    shape = ModelShape.from_model(mha_model)  # 4 KV heads of one query head each: TP 2 splits 2 or 4 of them
    gates = DMSGates(mha_model, tensor_parallel=2)
    with torch.no_grad():
        gates.operators["heads"].ratio.copy_(torch.tensor([0.0, 0.25, 0.5, 0.75]))  # 4, 3, 2, 1 heads asked
        gates.operators["channels"].ratio.copy_(torch.tensor([0.0, 0.3, 0.55, 0.9]))
    counts = gates.kept_counts()
    assert counts["heads"].tolist() == [4, 2, 2, 2]  # 3 -> 2 (the smaller on a tie), 1 -> 2 (fewest it splits)
    assert counts["channels"].tolist() == [96, 68, 44, 10]  # 67.2 and 43.2 asked: rounded to even widths
    structure = gates.hard_structure()
    assert all(splits_across(2, len(layer.kv_heads), shape.heads_per_group, len(layer.channels))
               for layer in structure.layers)
    plain = DMSGates(mha_model)  # no rounding without it
    with torch.no_grad():
        plain.operators["heads"].ratio.copy_(gates.operators["heads"].ratio)
        plain.operators["channels"].ratio.copy_(gates.operators["channels"].ratio)
    assert plain.kept_counts()["heads"].tolist() == [4, 3, 2, 1]
    assert plain.kept_counts()["channels"].tolist() == [96, 67, 43, 10]
    gates.remove()
    plain.remove()


def test_tensor_parallel_the_model_cannot_split_names_the_sizes_that_can(gqa_model):
    import pytest

    with pytest.raises(ValueError, match=r"size 3 cannot split .* sizes that can: 1, 2, 4"):
        DMSGates(gqa_model, tensor_parallel=3)  # hidden size 64
