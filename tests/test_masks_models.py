"""The prunable rule, grouped mask application, and the MNIST-scale models."""

import pytest
import torch
from torch import nn

from sparse_bench.errors import ConfigError
from sparse_bench.models import build_model
from sparse_bench.models.lenet import LeNet5Caffe, LeNet300100
from sparse_bench.sparsity.masks import MaskSet


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 10)
        self.extra = nn.Parameter(torch.ones(3, 3))

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).flatten(1))


def test_default_rule_masks_linear_and_conv_weights_only():
    ms = MaskSet.from_model(Net(), None)
    assert ms.names == ["conv.weight", "fc.weight"]


def test_exclude_and_include_patterns():
    ms = MaskSet.from_model(Net(), {"types": ["Linear", "Conv2d"], "exclude": ["fc.*"], "include": ["extra"]})
    assert ms.names == ["extra", "conv.weight"]  # the model's parameter order
    with pytest.raises(ConfigError, match="prunable"):
        MaskSet.from_model(Net(), {"types": ["Linear"], "exclude": ["*"]})
    with pytest.raises(ConfigError, match="prunable.types"):
        MaskSet.from_model(Net(), {"types": ["NotAModule"]})


def test_apply_zeroes_inactive_weights_and_leaves_the_rest():
    net = Net()
    ms = MaskSet.from_model(net, None)
    before = [p.detach().clone() for p in ms.params]
    masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.3 for i, p in enumerate(ms.params)]
    ms.set_masks(masks)
    for p, b, m in zip(ms.params, before, masks):
        assert torch.equal(p[m], b[m])
        assert torch.all(p[~m] == 0)
    assert torch.equal(net.bn.weight, torch.ones(4))  # norms untouched
    assert ms.nnz() == [int(m.sum()) for m in masks]
    state = ms.state_dict()
    ms2 = MaskSet.from_model(Net(), None)
    ms2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ms.masks, ms2.masks))


def test_paper_weight_counts():
    assert sum(MaskSet.from_model(LeNet300100(), None).numels) == 266_200
    assert sum(MaskSet.from_model(LeNet5Caffe(), None).numels) == 430_500


def _cfg(**kw):
    from omegaconf import OmegaConf

    return OmegaConf.create(kw)


def test_models_fit_their_data_and_misfits_are_one_line_errors():
    assert build_model(_cfg(name="lenet300_100", in_features=784), (1, 28, 28), 10)(
        torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert build_model(_cfg(name="lenet5_caffe"), (1, 28, 28), 10)(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert build_model(_cfg(name="mlp", hidden=[16]), (1, 8, 8), 10)(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ConfigError, match="model=lenet5_caffe does not fit") as e:
        build_model(_cfg(name="lenet5_caffe"), (1, 8, 8), 10)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model=lenet300_100 does not fit"):
        build_model(_cfg(name="lenet300_100", in_features=784), (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="model.name=nope is not a known model; choose one of: "):
        build_model(_cfg(name="nope"), (1, 8, 8), 10)
