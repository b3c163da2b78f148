import random

import pytest

from dms_llm.exporter import build_pruned_model
from dms_llm.gates import DMSGates
from dms_llm.resources import ResourceModel, count_parameters
from dms_llm.structure import ModelShape, Structure

from .conftest import tiny_llama


def random_structure(shape, rng, uniform=False):
    s = Structure.dense(shape)
    if uniform:
        g = rng.choice(shape.valid_uniform_group_counts())
        f = rng.randint(1, shape.intermediate_size)
        heads = sorted(rng.sample(range(shape.num_kv_heads), g))
        for layer in s.layers:
            layer.kv_heads = heads
            layer.channels = sorted(rng.sample(range(shape.intermediate_size), f))
        drop = rng.sample(range(shape.num_layers), rng.randint(0, shape.num_layers - 1))
        for i in drop:
            s.layers[i].kv_heads, s.layers[i].channels = [], []
        return s
    for layer in s.layers:
        layer.kv_heads = sorted(rng.sample(range(shape.num_kv_heads), rng.randint(0, shape.num_kv_heads)))
        width = rng.choice([0, rng.randint(1, shape.intermediate_size)])
        layer.channels = sorted(rng.sample(range(shape.intermediate_size), width))
    if not s.kept_layers():
        s.layers[0].channels = [0]
    return s


@pytest.mark.parametrize("kwargs", [{}, {"tie": False}, {"num_kv_heads": 4, "bias": True}])
def test_dense_params_match_the_model(kwargs):
    model = tiny_llama(**kwargs)
    assert ResourceModel(ModelShape.from_model(model)).dense() == count_parameters(model)


@pytest.mark.parametrize("seed", range(6))
def test_structure_params_match_the_exported_model(seed):
    rng = random.Random(seed)
    model = tiny_llama(num_kv_heads=rng.choice([1, 2, 4]), tie=bool(seed % 2), bias=seed % 3 == 0)
    shape = ModelShape.from_model(model)
    s = random_structure(shape, rng, uniform=seed % 2 == 0)
    assert ResourceModel(shape).of_structure(s) == count_parameters(build_pruned_model(model, s))


def test_soft_resource_is_differentiable_and_starts_near_dense(gqa_model):
    gates = DMSGates(gqa_model)
    res = ResourceModel(gates.shape)
    r = res.of_gates(gates)
    assert 0.75 * res.dense() < r.item() < res.dense()  # the lowest-ranked layer starts half-gated (m = 0.5 at a = 0)
    r.backward()
    assert all(op.ratio.grad is not None and (op.ratio.grad < 0).all() for op in gates.operators.values())


def test_macs_fall_with_structure(gqa_model):
    shape = ModelShape.from_model(gqa_model)
    res = ResourceModel(shape, "macs", seq_len=128)
    s = Structure.dense(shape)
    dense = res.of_structure(s)
    s.layers[0].kv_heads = [0]
    assert res.of_structure(s) < dense
    s.layers[1].channels = []
    assert res.of_structure(s) < dense
    with pytest.raises(ValueError):
        ResourceModel(shape, "flops")
