"""Initial densities: exact to the weight for uniform / ER / ERK; the Bernoulli draw in expectation."""

import math

import pytest
import torch

from sparse_bench.errors import ConfigError
from sparse_bench.models.lenet import LeNet5Caffe, LeNet300100
from sparse_bench.sparsity.distributions import allocate, layer_counts, layer_densities, random_masks
from sparse_bench.sparsity.masks import MaskSet


def shapes_of(model):
    return MaskSet.from_model(model, None).shapes


MODELS = {"lenet300_100": LeNet300100, "lenet5_caffe": LeNet5Caffe}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("kind", ["uniform", "er", "erk"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.5])
def test_masks_hit_global_density_exactly(model, kind, density):
    shapes = shapes_of(MODELS[model]())
    total = sum(math.prod(s) for s in shapes)
    masks = random_masks(shapes, density, kind, torch.Generator().manual_seed(0))
    nnz = sum(int(m.sum()) for m in masks)
    assert nnz == round(density * total)
    counts = layer_counts(shapes, density, kind)
    assert [int(m.sum()) for m in masks] == counts
    assert all(0 <= c <= math.prod(s) for c, s in zip(counts, shapes))


def test_uniform_is_the_same_density_in_every_layer():
    shapes = shapes_of(LeNet300100())
    counts = layer_counts(shapes, 0.05, "uniform")
    for c, s in zip(counts, shapes):
        assert abs(c - 0.05 * math.prod(s)) <= 1


def test_erk_densities_follow_the_formula_and_cap_at_one():
    shapes = shapes_of(LeNet5Caffe())  # at 10% ERK makes conv1 (20,1,5,5) and fc4 (10,500) dense
    dens = layer_densities(shapes, 0.1, "erk")
    raw = [sum(s) / math.prod(s) for s in shapes]
    assert dens[0] == 1.0 and dens[3] == 1.0
    free = [i for i, d in enumerate(dens) if d < 1.0]
    ratios = [dens[i] / raw[i] for i in free]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    numels = [math.prod(s) for s in shapes]
    assert sum(d * n for d, n in zip(dens, numels)) == pytest.approx(0.1 * sum(numels))


def test_er_uses_fan_in_plus_fan_out():
    shapes = [(300, 784), (100, 300), (10, 100)]
    dens = layer_densities(shapes, 0.1, "er")
    raw = [(784 + 300) / (784 * 300), (300 + 100) / (300 * 100), (100 + 10) / (100 * 10)]
    free = [i for i, d in enumerate(dens) if d < 1.0]
    assert len({round(dens[i] / raw[i], 9) for i in free}) == 1
    conv = layer_densities([(50, 20, 5, 5), (500, 800)], 0.1, "er")
    # conv fan-in is C_in*kh*kw = 500, fan-out C_out = 50
    r_conv, r_fc = (500 + 50) / (500 * 50), (800 + 500) / (800 * 500)
    assert conv[0] / conv[1] == pytest.approx(r_conv / r_fc)


def test_bernoulli_is_exact_only_in_expectation():
    shapes = shapes_of(LeNet300100())
    masks = random_masks(shapes, 0.05, "bernoulli", torch.Generator().manual_seed(1))
    nnz = sum(int(m.sum()) for m in masks)
    total = sum(math.prod(s) for s in shapes)
    assert abs(nnz - 0.05 * total) < 5 * math.sqrt(total * 0.05 * 0.95)


def test_masks_depend_on_the_generator_seed():
    shapes = shapes_of(LeNet300100())
    a = random_masks(shapes, 0.05, "uniform", torch.Generator().manual_seed(0))
    b = random_masks(shapes, 0.05, "uniform", torch.Generator().manual_seed(0))
    c = random_masks(shapes, 0.05, "uniform", torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_allocate_is_exact_and_respects_caps():
    assert allocate([1.5, 1.5, 1.0], [10, 10, 10], 4) == [2, 1, 1]
    assert sum(allocate([0.3] * 7, [1] * 7, 2)) == 2
    assert allocate([5.0, 5.0], [2, 10], 10) == [2, 8]
    with pytest.raises(ValueError):
        allocate([1.0], [1], 2)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_range_is_a_config_error(density):
    with pytest.raises(ConfigError, match="density"):
        layer_densities([(10, 10)], density, "uniform")


def test_unknown_distribution_is_a_config_error():
    with pytest.raises(ConfigError, match="method.init"):
        layer_densities([(10, 10)], 0.5, "gaussian")
