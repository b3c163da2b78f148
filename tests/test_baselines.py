import torch

from dms_llm.baselines import block_influence, random_uniform, shortgpt, taylor_uniform
from dms_llm.resources import ResourceModel
from dms_llm.structure import ModelShape


def test_baselines_meet_the_budget_with_their_shapes(gqa_model, calib):
    shape = ModelShape.from_model(gqa_model)
    res = ResourceModel(shape)
    target = int(0.75 * res.dense())
    before = {k: v.clone() for k, v in gqa_model.state_dict().items()}
    uniform_taylor = taylor_uniform(gqa_model, calib, target, batch_size=2, spare_first=0, spare_last=0)
    for structure in (uniform_taylor, random_uniform(gqa_model, target)):
        assert res.of_structure(structure) <= target and structure.is_uniform()
        assert len(structure.kept_layers()) == shape.num_layers
    # LLM-Pruner's recipe: first and last layers dense, the others equally narrower, the budget still met
    spared = taylor_uniform(gqa_model, calib, target, batch_size=2, spare_first=1, spare_last=1)
    dense_layer = (list(range(shape.num_kv_heads)), list(range(shape.intermediate_size)))
    assert res.of_structure(spared) <= target and res.of_structure(spared) > 0.7 * res.dense()
    assert [(x.kv_heads, x.channels) for x in (spared.layers[0], spared.layers[3])] == [dense_layer] * 2
    assert spared.layers[1].channels != dense_layer[1]
    assert (len(spared.layers[1].kv_heads), len(spared.layers[1].channels)) == \
        (len(spared.layers[2].kv_heads), len(spared.layers[2].channels))
    s = shortgpt(gqa_model, calib, target)
    assert res.of_structure(s) <= target and s.is_uniform() and len(s.kept_layers()) < shape.num_layers
    assert all(torch.equal(v, before[k]) for k, v in gqa_model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in gqa_model.modules())


def test_block_influence_is_zero_for_an_identity_layer(gqa_model, calib):
    with torch.no_grad():
        layer = gqa_model.model.layers[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    bi = block_influence(gqa_model, calib[:2])
    assert bi[2].abs() < 1e-5 and (bi[[0, 1, 3]] > 1e-3).all()
    s = shortgpt(gqa_model, calib[:2], int(0.9 * ResourceModel(ModelShape.from_model(gqa_model)).dense()))
    assert s.layers[2].kv_heads == [] and s.kept_layers() == [0, 1, 3]
