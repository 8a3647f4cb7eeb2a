"""The papers' CIFAR/ImageNet models: weight counts, output shapes, width options, timm, YAMLs.

Expected counts are written out as layer arithmetic of the reference architectures (not read off
our modules), and checked against the papers' rounded numbers (REFERENCE.md sections 1-2).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sparse_bench.errors import ConfigError
from sparse_bench.models import _BUILDERS, build_model
from sparse_bench.schema import check_option
from sparse_bench.sparsity.masks import MaskSet

from conftest import CONF, compose

CIFAR = (3, 32, 32)
# the input each model YAML is made for; anything not listed is a CIFAR model
INPUT = {"lenet300_100": (1, 28, 28), "lenet5_caffe": (1, 28, 28), "mlp": (1, 8, 8), "resnet50": (3, 224, 224)}
YAMLS = sorted(p.stem for p in Path(CONF, "model").glob("*.yaml"))


def cfg(**kw):
    return OmegaConf.create(kw)


def make(name: str, shape=CIFAR, classes: int = 10, **kw):
    """The builder alone (on the schema-checked config), without build_model's fit-check forward
    pass (for counts only)."""
    return _BUILDERS[name](check_option("model", cfg(name=name, **kw)), shape, classes)


def masked(model) -> int:
    return sum(MaskSet.from_model(model, None).numels)


@pytest.fixture(scope="module")
def built():
    """Models composed from their YAMLs and built (with the fit check) once per module, at C = 10."""
    cache: dict = {}

    def get(stem: str):
        if stem not in cache:
            c = compose([f"model={stem}"])
            cache[stem] = build_model(c.model, INPUT.get(stem, CIFAR), 10)
        return cache[stem]

    yield get
    cache.clear()


# ---- expected counts from the reference architectures -------------------------------------------

def alexnet_count(f: int, c: int = 10) -> int:
    convs = 3 * 96 * 11 * 11 + 96 * 256 * 5 * 5 + 256 * 384 * 9 + 384 * 384 * 9 + 384 * 256 * 9
    h = 1024 * f
    return convs + 256 * h + h * h + h * c  # a 32x32 input leaves 256x1x1 after five stride-2 convs


def vgg_count(config: str, c: int = 10) -> int:
    third = {"C": 1, "D": 9, "like": 9}[config]  # kernel area of the third conv in blocks 3-5
    convs = (3 * 64 + 64 * 64 + 64 * 128 + 128 * 128) * 9
    convs += (256 * 128 + 256 * 256) * 9 + 256 * 256 * third
    convs += (512 * 256 + 512 * 512) * 9 + 512 * 512 * third
    convs += (512 * 512 + 512 * 512) * 9 + 512 * 512 * third
    if config == "like":
        return convs + 512 * 512 + 512 * c
    flat = 2048 if config == "C" else 512
    return convs + flat * 512 + 512 * 512 + 512 * c


def wrn_count(depth: int, k: int, c: int = 10) -> int:
    n = (depth - 4) // 6
    total = 3 * 16 * 9
    cin = 16
    for w in (16 * k, 32 * k, 64 * k):
        total += cin * w * 9 + w * w * 9 + (cin * w if cin != w else 0)  # first block, 1x1 shortcut
        total += (n - 1) * 2 * w * w * 9
        cin = w
    return total + 64 * k * c


PAPER = [  # (yaml, exact count of the reference architecture, the paper's number in millions)
    ("alexnet_s", alexnet_count(1), 5.07),
    ("alexnet_b", alexnet_count(2), 8.48),
    ("vgg16_d", vgg_count("D"), 15.24),
    ("vgg16_c", vgg_count("C"), None),
    ("vgg16_like", vgg_count("like"), None),
    ("wrn16_8", wrn_count(16, 8), 10.95),
    ("wrn16_10", wrn_count(16, 10), 17.11),
    ("wrn22_8", wrn_count(22, 8), 17.15),
    ("wrn28_2", wrn_count(28, 2), 1.46),
    ("wrn28_10", wrn_count(28, 10), None),
    ("wrn28_10_acdc", wrn_count(28, 10), None),  # the AC/DC code's WRN: the same weight tensors, plus biases
]


@pytest.mark.parametrize("stem,exact,paper", PAPER, ids=[p[0] for p in PAPER])
def test_sparse_momentum_models_have_the_papers_masked_weight_counts(built, stem, exact, paper):
    n = masked(built(stem))
    assert n == exact
    if paper is not None:
        assert round(n / 1e6, 2) == paper


def test_resnet56_has_option_a_shortcuts_and_085m_parameters(built):
    model = built("resnet56")
    ms = MaskSet.from_model(model, None)
    assert len(ms.names) == 56  # 55 convs + the classifier: option-A shortcuts have no weights
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e6, 2) == 0.85
    assert total == 853_018  # akamaster / GSE ResNet-56 at 10 classes


def test_vgg16_small_and_vit_counts(built):
    convs = (3 * 16 + 16 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 2 * 64 * 64 + 64 * 128 + 5 * 128 * 128) * 9
    assert masked(built("vgg16_small")) == convs + 128 * 512 + 512 * 512 + 512 * 10
    vit = built("vit_cifar")
    per_block = 512 * 3 * 6 * 64 + 6 * 64 * 512 + 2 * 512 * 256
    assert masked(vit) == 4 * 4 * 3 * 512 + 4 * per_block + 512 * 10
    names = MaskSet.from_model(vit, None).names
    assert len(names) == 1 + 4 * 4 + 1  # patch projection, (qkv, out, mlp1, mlp2) x 4, head
    assert not any("in_proj" in n for n in names)


def test_vit_position_embedding_is_fixed_sincos():
    vit = build_model(cfg(name="vit_cifar"), CIFAR, 10)
    assert not any("pos" in n for n, _ in vit.named_parameters())
    assert "pos_embedding" not in vit.state_dict()
    pe = vit.pos_embedding
    assert pe.shape == (64, 512)  # 8x8 patches of 4x4 pixels
    q = 128
    assert torch.equal(pe[0], torch.cat([torch.zeros(q), torch.ones(q), torch.zeros(q), torch.ones(q)]))
    # the patch at row 2, column 5: first quarter sin(5 * omega), third quarter sin(2 * omega)
    omega = 10000.0 ** -(torch.arange(q, dtype=torch.float32) / (q - 1))
    assert torch.allclose(pe[2 * 8 + 5, :q], torch.sin(5 * omega), atol=1e-6)
    assert torch.allclose(pe[2 * 8 + 5, 2 * q:3 * q], torch.sin(2 * omega), atol=1e-6)


def test_resnet50_is_torchvisions_without_weights():
    model = make("resnet50", (3, 224, 224), 1000)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    gray = make("resnet50", (1, 224, 224), 10)
    assert gray.conv1.in_channels == 1 and gray.fc.out_features == 10


# ---- every YAML composes, builds, and gives (2, C) in training mode too --------------------------

@pytest.mark.parametrize("stem", YAMLS)
def test_every_model_yaml_composes_builds_and_gives_batch_outputs(built, stem):
    model = built(stem)  # build_model already checks (2, C) in eval mode
    if stem in ("resnet50", "timm"):
        return  # third-party networks: the eval-mode fit check is enough
    model.train()  # BatchNorm1d heads must also take a batch of 2 while training
    with torch.no_grad():
        out = model(torch.randn(2, *INPUT.get(stem, CIFAR), generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_the_cifar_models_read_classes_and_channels_from_the_data():
    for name, kw in (("alexnet_s", {}), ("vgg16_like", {}), ("wrn28_2", {}), ("resnet_cifar", {"depth": 20}),
                     ("vgg16_small", {}), ("vit_cifar", {})):
        m = build_model(cfg(name=name, **kw), (1, 32, 32), 7)  # the fit check asserts 7 outputs
        first = MaskSet.from_model(m, None).params[0]
        assert first.shape[1] == (16 if name == "vit_cifar" else 1), name  # ViT: 4x4 patches of 1 channel


# ---- width multipliers -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet56", "vgg16_small", "vit_cifar"])
def test_width_multiplier_scales_inner_layers_quadratically(name):
    """Doubling width multiplies every weight by 4 except the first and last layers (by 2)."""
    one = MaskSet.from_model(make(name, width=1.0), None)
    two = MaskSet.from_model(make(name, width=2.0), None)
    edge = one.numels[0] + one.numels[-1]
    assert sum(two.numels) == 4 * sum(one.numels) - 2 * edge
    half = build_model(cfg(name=name, width=0.5), CIFAR, 10)  # and a narrower one runs
    assert masked(half) < sum(one.numels)


def test_odd_widths_still_fit_option_a_shortcuts():
    model = build_model(cfg(name="resnet_cifar", depth=20, width=0.3), CIFAR, 10)  # 4, 9, 19 channels
    assert model.linear.in_features == 19


def test_wrn_generic_matches_named_and_widen_factor_scales():
    assert masked(make("wrn", depth=16, widen_factor=8)) == wrn_count(16, 8)
    assert masked(build_model(cfg(name="wrn", depth=10, widen_factor=1), CIFAR, 10)) == wrn_count(10, 1)
    with pytest.raises(ConfigError, match="model.depth=17"):
        build_model(cfg(name="wrn", depth=17, widen_factor=8), CIFAR, 10)
    with pytest.raises(ConfigError, match=r"model.depth=28 contradicts model=wrn16_8"):
        build_model(cfg(name="wrn16_8", depth=28, widen_factor=8), CIFAR, 10)
    with pytest.raises(ConfigError, match="model.depth=57"):
        build_model(cfg(name="resnet_cifar", depth=57), CIFAR, 10)


@pytest.mark.parametrize("name", ["alexnet_s", "vgg16_d", "wrn16_8", "resnet50"])
def test_width_is_refused_where_the_papers_have_none(name):
    with pytest.raises(ConfigError, match=f"model.width is not a config key; the keys of model={name} are"):
        build_model(cfg(name=name, width=2.0), CIFAR, 10)
    with pytest.raises(ConfigError, match=r"model.width=-1.0 must be > 0"):
        build_model(cfg(name="resnet56", width=-1.0), CIFAR, 10)
    with pytest.raises(ConfigError, match="model.depth is not a config key; the keys of model=resnet56"):
        build_model(cfg(name="resnet56", depth=20), CIFAR, 10)  # model=resnet_cifar model.depth=D instead


# ---- timm pass-through -----------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_timm_pass_through_builds_offline(no_network):
    c = compose(["model=timm", "model.arch=test_resnet"])
    assert c.model.name == "timm" and c.model.arch == "test_resnet"
    model = build_model(c.model, (1, 28, 28), 7)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    first = MaskSet.from_model(model, None).params[0]
    assert first.shape[1] == 1  # in_chans from the data
    kw = build_model(cfg(name="timm", arch="test_vit", kwargs={"img_size": 32}), CIFAR, 10)
    assert kw(torch.zeros(2, *CIFAR)).shape == (2, 10)


def test_timm_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="model.arch=no_such_net is not a timm model") as e:
        build_model(cfg(name="timm", arch="no_such_net"), CIFAR, 10)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.kwargs.pretrained"):
        build_model(cfg(name="timm", arch="test_resnet", kwargs={"pretrained": True}), CIFAR, 10)
