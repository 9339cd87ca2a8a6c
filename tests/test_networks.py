"""The three CNNs (neural/networks.py) have the papers' architectures."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ResNet
from torch import nn

from neural import networks
from neural.networks import (
    CONVNEXT_VARIANTS,
    GRN,
    ConvNeXtV2,
    FeatureHook,
    NetworkSpec,
    UNet2D,
    relu_channels,
)


def test_unet_is_paper_1s_at_full_width() -> None:
    net = UNet2D(width=1.0)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:10:2]] == [64, 128, 256, 512, 1024]  # encoder
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 18 and all(n.num_groups == 2 for n in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert net.relu_names() == ["activation"] + [f"activation_{i}" for i in range(1, 18)]
    assert relu_channels(net, "activation_9") == 1024  # the authors' layer: the bottleneck
    assert relu_channels(net, "activation_8") == 1024 and relu_channels(net, "activation_7") == 512
    x = torch.randn(2, 1, 64, 64)
    hook = FeatureHook(net, networks.DSFR_LAYER)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 1, 64, 64)  # one logit per pixel
    assert hook.output is not None and hook.output.shape == (2, 1024, 4, 4)
    assert float(hook.output.min()) >= 0  # a ReLU's output
    hook.close()
    with pytest.raises(ValueError, match="unknown DSFR layer"):
        FeatureHook(net, "activation_99")


def test_width_scales_every_model() -> None:
    small = UNet2D(width=0.125)
    assert small.channels == (8, 16, 32, 64, 128)
    mri = NetworkSpec("dl_mri", width=0.25).build(0)
    assert isinstance(mri, ResNet) and mri.layer4[0].conv1.out_channels == 128
    us = NetworkSpec("dl_us", width=0.5, variant="atto").build(0)
    assert us.head.fc.in_features == 160


def test_resnet18_is_monais_with_one_channel_and_one_logit() -> None:
    net = NetworkSpec("dl_mri", width=1.0).build(0)
    assert isinstance(net, ResNet)
    assert net.conv1.in_channels == 1 and net.fc.out_features == 1
    assert [len(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)] == \
        [2, 2, 2, 2]  # ResNet18's basic blocks
    assert net.conv1.stride == (2, 2, 2)  # MedicalNet-style stem
    assert not any(".downsample." in k for k in net.state_dict())  # MedicalNet's shortcut A
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 32, 32)).shape == (2, 1)


@pytest.mark.parametrize("variant", list(CONVNEXT_VARIANTS))
def test_convnext_v2_variants(variant: str) -> None:
    depths, dims = CONVNEXT_VARIANTS[variant]
    net = ConvNeXtV2(variant)
    assert [len(stage.blocks) for stage in net.stages] == list(depths)
    assert [stage.blocks[0].conv_dw.in_channels for stage in net.stages] == list(dims)
    assert sum(isinstance(m, GRN) for m in net.modules()) == sum(depths)
    if variant == "atto":
        assert 3.3e6 < networks.count_parameters(net) < 3.8e6  # the paper's 3.7M (3 ch in)
        with torch.no_grad():
            assert net(torch.randn(2, 1, 64, 64)).shape == (2, 1)


def test_grn_is_the_papers_formula() -> None:
    grn = GRN(6)
    x = torch.randn(2, 5, 5, 6)
    assert torch.equal(grn(x), x)  # γ = β = 0 at init: identity
    with torch.no_grad():
        grn.weight.fill_(0.5)
        grn.bias.fill_(0.1)
    gx = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(grn(x), 0.5 * x * nx + 0.1 + x)


def test_same_seed_same_initial_weights_everywhere() -> None:
    for model in networks.MODELS:
        a = NetworkSpec(model, width=0.0625).build(7).state_dict()
        b = NetworkSpec(model, width=0.0625).build(7).state_dict()
        c = NetworkSpec(model, width=0.0625).build(8).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)
    assert networks.gradcam_layer("dl_mri") == "layer4"
