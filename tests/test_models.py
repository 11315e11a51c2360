"""The model zoo: published parameter counts, layouts the rules rely on, errors, the generated docs table, and
every model × every rule doing a forward/backward step with finite gradients (parametrised over both registries)."""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bioprop
import bioprop.models as models_module
from bioprop.models import count_parameters, create_model, list_models, model_info, model_table, register_model
from bioprop.models.resnet import PadShortcut
from bioprop.rules import RULES

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "alexnet", "alexnet_bn")


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """These steps are tiny; one intra-op thread avoids oversubscription on a shared machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meta_params(name: str, **kwargs: object) -> int:
    with torch.device("meta"):
        return count_parameters(create_model(name, **kwargs))


def test_registry_has_the_papers_models() -> None:
    assert {"mlp", "nokland_convnet", "lenet", "resnet20", "resnet32", "resnet56", "resnet18", "resnet34",
            "resnet50", "alexnet", "alexnet_bn", "small_convnet"} <= set(list_models())


def test_published_imagenet_parameter_counts() -> None:
    # torchvision's published counts for the same architectures at 1000 classes
    assert meta_params("resnet18", num_classes=1000, in_channels=3, image_size=224) == 11_689_512
    assert meta_params("resnet34", num_classes=1000, in_channels=3, image_size=224) == 21_797_672
    assert meta_params("resnet50", num_classes=1000, in_channels=3, image_size=224) == 25_557_032
    assert meta_params("alexnet", num_classes=1000, in_channels=3, image_size=224) == 61_100_840


def cifar_resnet_count(n: int, classes: int = 10) -> int:
    """Closed form: 3×3 convs without bias, BN (2 per channel), option-A shortcuts have no parameters."""
    total = 3 * 16 * 9 + 2 * 16
    channels = 16
    for width in (16, 32, 64):
        for block in range(n):
            total += channels * width * 9 + 2 * width + width * width * 9 + 2 * width
            channels = width
    return total + 64 * classes + classes


@pytest.mark.parametrize("name,n,published", [("resnet20", 3, 0.27), ("resnet32", 5, 0.46), ("resnet56", 9, 0.85)])
def test_cifar_resnet_parameter_counts(name: str, n: int, published: float) -> None:
    count = meta_params(name, num_classes=10, in_channels=3, image_size=32)
    assert count == cifar_resnet_count(n)
    assert round(count / 1e6, 2) == published  # He et al. 2016, Table 6


def test_lenet_and_nokland_convnet_counts() -> None:
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731
    lin = lambda i, o: i * o + o  # noqa: E731
    # BioTorch LeNet MNIST (32×32 after padding) and CIFAR variants
    assert meta_params("lenet", in_channels=1, image_size=28) == (
        conv(1, 6, 5) + conv(6, 16, 5) + conv(16, 120, 5) + lin(120, 84) + lin(84, 10))
    assert meta_params("lenet", in_channels=3, image_size=32) == (
        conv(3, 32, 3) + conv(32, 64, 3) + conv(64, 128, 3) + lin(128, 256) + lin(256, 10))
    # nokland2016: 32 -> 15 -> 7 -> 3 after three 3×3/2 poolings
    assert meta_params("nokland_convnet", in_channels=3, image_size=32) == (
        conv(3, 96, 5) + conv(96, 128, 5) + conv(128, 256, 5) + lin(256 * 9, 2048) + lin(2048, 2048)
        + lin(2048, 10))


def test_docs_table_is_generated_from_the_registry() -> None:
    assert model_table() in DOCS.read_text(), "docs/models.md is stale: paste bioprop.models.model_table()"


@pytest.mark.parametrize("name", list_models())
def test_documented_configuration_gives_logits(name: str) -> None:
    info = model_info(name)
    with torch.device("meta"):  # shapes only, at the full documented size, without memory
        net = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels,
                           image_size=info.image_size)
        out = net(torch.empty(3, info.in_channels, info.image_size, info.image_size))
    assert out.shape == (3, info.num_classes)


@pytest.mark.parametrize("name", list_models())
def test_smallest_documented_input_works(name: str) -> None:
    info = model_info(name)
    size = max(info.min_image_size, 18 if name == "lenet" else 0)
    with torch.device("meta"):
        net = create_model(name, num_classes=4, in_channels=3, image_size=size)
        assert net(torch.empty(2, 3, size, size)).shape == (2, 4)
    if info.min_image_size > 1:
        with pytest.raises(ValueError, match=f"image_size >= {info.min_image_size}"):
            create_model(name, image_size=info.min_image_size - 1)


def test_mlp_layout_for_direct_feedback() -> None:
    net = create_model("mlp", depth=2, width=7, activation="logistic", dropout_input=0.1, dropout_hidden=0.5,
                       image_size=3)
    assert isinstance(net, nn.Sequential)
    assert [type(m) for m in net] == [nn.Flatten, nn.Dropout, nn.Linear, nn.Sigmoid, nn.Dropout, nn.Linear,
                                      nn.Sigmoid, nn.Dropout, nn.Linear]
    assert net[1].p == 0.1 and net[4].p == 0.5
    plain = create_model("mlp", depth=3, width=5, activation="relu", image_size=4)
    assert [type(m) for m in plain] == [nn.Flatten] + [nn.Linear, nn.ReLU] * 3 + [nn.Linear]
    assert [type(m) for m in create_model("mlp", depth=0, image_size=4)] == [nn.Flatten, nn.Linear]


def test_mlp_forward_matches_numpy() -> None:
    torch.manual_seed(0)
    net = create_model("mlp", depth=2, width=6, activation="tanh", num_classes=3, in_channels=2, image_size=3).double()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    h = x.reshape(4, -1).numpy()
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for i, layer in enumerate(linears):
        h = h @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()
        if i < len(linears) - 1:
            h = np.tanh(h)
    np.testing.assert_allclose(net(x).detach().numpy(), h, rtol=1e-12, atol=1e-12)


def test_zero_init() -> None:
    net = create_model("mlp", zero_init=True, width=10)
    assert all(not p.detach().any() for p in net.parameters())
    conv = create_model("nokland_convnet", zero_init=True, in_channels=3, image_size=16)
    assert all(not p.detach().any() for p in conv.parameters())


def test_alexnet_bn_is_xiao2018s_variant() -> None:
    with torch.device("meta"):
        net = create_model("alexnet_bn", in_channels=3, image_size=64)
        classic = create_model("alexnet", in_channels=3, image_size=64)
    modules = [m for m in net.modules() if not isinstance(m, nn.Sequential)]
    assert not any(isinstance(m, nn.Dropout) for m in modules)
    for i, m in enumerate(modules):
        if isinstance(m, nn.ReLU):
            assert isinstance(modules[i - 1], (nn.BatchNorm1d, nn.BatchNorm2d))  # BN before every ReLU
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            followed_by_bn = i + 1 < len(modules) and isinstance(modules[i + 1], (nn.BatchNorm1d, nn.BatchNorm2d))
            assert (m.bias is None) == followed_by_bn  # no bias before BN, a bias elsewhere
    assert sum(isinstance(m, nn.Dropout) for m in classic.modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in classic.modules())


def test_option_a_shortcut() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, 2)(x)
    expected = torch.zeros(2, 32, 4, 4)
    expected[:, 8:24] = x[:, :, ::2, ::2]
    assert torch.equal(out, expected)


def test_lenet_variants() -> None:
    mnist = create_model("lenet", in_channels=1, image_size=28)
    assert mnist[0].padding == (2, 2) and mnist[0].out_channels == 6
    assert create_model("lenet", in_channels=3, image_size=32)[0].out_channels == 32
    assert create_model("lenet", variant="mnist", in_channels=3, image_size=32)[0].padding == (0, 0)
    with pytest.raises(ValueError, match="unknown lenet variant 'x'; allowed: auto, mnist, cifar"):
        create_model("lenet", variant="x")


def test_create_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'; allowed: mlp, nokland_convnet"):
        create_model("vgg")
    with pytest.raises(ValueError, match="model 'mlp' has no option.*'depht'.*allowed: depth, width, activation"):
        create_model("mlp", depht=3)
    with pytest.raises(ValueError, match="model 'alexnet_bn' has no option.*'dropout'.*allowed: hidden"):
        create_model("alexnet_bn", image_size=64, dropout=0.5)
    with pytest.raises(ValueError, match="unknown activation 'gelu'; allowed: tanh, logistic, relu"):
        create_model("mlp", activation="gelu")
    with pytest.raises(ValueError, match="num_classes >= 1"):
        create_model("mlp", num_classes=0)
    with pytest.raises(ValueError, match="dropout_hidden must be in"):
        create_model("mlp", dropout_hidden=1.0)


def test_narrow_variants_keep_the_layer_graph() -> None:
    with torch.device("meta"):
        for name, options in (("resnet50", {"width": 16}), ("resnet18", {"width": 8}), ("alexnet", {"hidden": 512}),
                              ("alexnet_bn", {"hidden": 512})):
            full = create_model(name, num_classes=1000, in_channels=3, image_size=224)
            narrow = create_model(name, num_classes=1000, in_channels=3, image_size=224, **options)
            assert [type(m) for m in narrow.modules()] == [type(m) for m in full.modules()]
            assert [n for n, _ in narrow.named_parameters()] == [n for n, _ in full.named_parameters()]
            assert count_parameters(narrow) < count_parameters(full) / 4


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # leave the real registry alone
    monkeypatch.setattr(models_module.registry, "MODELS", copy.deepcopy(models_module.registry.MODELS))

    @register_model("linear_probe", paper="test", min_image_size=2)
    def linear_probe(num_classes: int, in_channels: int, image_size: int, *, bias: bool = True) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes, bias=bias))

    assert "linear_probe" in models_module.list_models()
    assert model_info("linear_probe").options == {"bias": True}
    assert create_model("linear_probe", num_classes=3, image_size=4, bias=False)(torch.zeros(2, 1, 4, 4)).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_model("linear_probe")(linear_probe)
    with pytest.raises(ValueError, match="must start with \\(num_classes, in_channels, image_size\\)"):
        register_model("bad")(lambda n: nn.Identity())


# ------------------------------------------------------------------------ every model × every rule

# ImageNet nets at tiny resolution (AlexNet's smallest input is 63) and batch 2 so the whole grid stays quick.
# The AlexNets run with 512 instead of 4096 hidden units: the same layer graph without the 54M classifier weights
# that would dominate every step; their full-size graphs are checked above on the meta device.
SMALL_INPUT = {"alexnet": 63, "alexnet_bn": 63, "resnet18": 16, "resnet34": 16, "resnet50": 16, "lenet": 28,
               "nokland_convnet": 15, "tf_cifar10": 24}
SMALL_OPTIONS = {"alexnet": {"hidden": 512}, "alexnet_bn": {"hidden": 512}}


def is_direct(rule: str) -> bool:
    """Whether ``rule`` is a direct-feedback rule, as the rule declares it (its ``kind``)."""
    return RULES.get(rule).kind == "direct"


@functools.lru_cache(maxsize=1)
def base_model(name: str) -> tuple[nn.Module, int, int]:
    """One initialised model per name (the grid deep-copies it per rule instead of re-initialising)."""
    channels = 1 if name in ("mlp", "lenet", "small_convnet") else 3
    size = SMALL_INPUT.get(name, 8)
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_channels=channels, image_size=size, **SMALL_OPTIONS.get(name, {}))
    return model, channels, size


def ifa_refuses(rule: str, err: Exception) -> bool:
    """ifa sends the error forward through the first layer of each block, so it needs blocks that keep their size
    and start with a linear/conv layer (dense_fa reads each block's error there, so it needs the latter); the
    library refuses other layouts with a ValueError naming the rule."""
    reads_entries = is_direct(rule) and RULES.get(rule).graph != "direct"  # ifa, dense_fa
    return reads_entries and isinstance(err, ValueError) and rule in str(err)


@pytest.mark.parametrize("rule", bioprop.list_rules())
@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_with_every_rule(name: str, rule: str) -> None:
    base, channels, size = base_model(name)
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    x, y = torch.randn(2, channels, size, size), torch.tensor([0, 3])
    try:
        model = bioprop.convert(model, rule, seed=0)
        logits = model(x)
    except (NotImplementedError, ValueError) as err:
        if (is_direct(rule) and isinstance(err, NotImplementedError)) or ifa_refuses(rule, err):
            pytest.skip(f"{rule} does not support {name}: {err}")
        raise
    assert logits.shape == (2, 5)
    F.cross_entropy(logits, y).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{rule} left no gradient on {missing[:5]}"
    # one reduction per tensor: NaN or inf anywhere makes the sum non-finite
    sums = torch.stack([p.grad.sum() for p in model.parameters() if p.grad is not None])
    assert bool(torch.isfinite(sums).all()), f"{rule} produced non-finite gradients in {name}"
    assert any(float(p.grad.abs().max()) > 0 for p in model.parameters() if p.grad is not None)
