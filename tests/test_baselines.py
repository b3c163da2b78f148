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


def test_stronger_peers_meet_the_budget_and_leave_the_model_unchanged(gqa_model, calib):
    from dms_llm.baselines import activation_stats, flap, minitron_width, sleb, wanda_sp

    shape = ModelShape.from_model(gqa_model)
    res = ResourceModel(shape)
    target = int(0.7 * res.dense())
    before = {k: v.clone() for k, v in gqa_model.state_dict().items()}
    stats = activation_stats(gqa_model, calib)
    structures = {"flap": flap(gqa_model, stats, target), "wanda_sp": wanda_sp(gqa_model, calib, target),
                  "sleb": sleb(gqa_model, calib, target), "minitron": minitron_width(gqa_model, stats, calib, target)}
    assert ResourceModel(shape, output_bias=True).of_structure(structures["flap"]) <= target
    for name, s in structures.items():
        s.validate(shape)
        assert res.of_structure(s) <= target and res.of_structure(s) > 0.5 * res.dense(), name
    for name in ("wanda_sp", "minitron"):  # the same widths in every layer, all layers kept
        assert structures[name].is_uniform() and len(structures[name].kept_layers()) == shape.num_layers, name
    assert len(structures["sleb"].kept_layers()) < shape.num_layers  # whole layers removed
    assert all(torch.equal(v, before[k]) for k, v in gqa_model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in gqa_model.modules())


def test_flap_bias_restores_the_mean_output_of_a_pruned_block(gqa_model, calib):
    """Layer 0 loses MLP channels only: with FLAP's bias its MLP output keeps the dense mean on calibration tokens."""
    from dms_llm.baselines import activation_stats, flap_bias
    from dms_llm.exporter import build_pruned_model
    from dms_llm.structure import Structure

    shape = ModelShape.from_model(gqa_model)
    structure = Structure.dense(shape)
    structure.layers[0].channels = structure.layers[0].channels[::2]
    stats = activation_stats(gqa_model, calib)
    pruned = build_pruned_model(gqa_model, structure, output_bias=True)

    def mean_mlp_output(model, ids):
        seen = []
        handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            model(input_ids=ids)
        handle.remove()
        return seen[0].reshape(-1, shape.hidden_size).mean(0)

    dense_mean = mean_mlp_output(gqa_model, calib)
    gap_before = (mean_mlp_output(pruned, calib) - dense_mean).abs().max()
    flap_bias(pruned, gqa_model, structure, stats)
    gap_after = (mean_mlp_output(pruned, calib) - dense_mean).abs().max()
    assert gap_after < 1e-4 < gap_before
