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
