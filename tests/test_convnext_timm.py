"""The ConvNeXt V2 of neural/networks.py is timm's (same state-dict keys, shapes and forward),
and `adapt_pretrained` turns timm / MedicalNet / our own checkpoints into states that load
with strict=True into our networks, refusing files for another model or variant."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from monai.networks.nets import resnet18
from torch.nn import functional as F

from neural import networks
from neural.networks import (
    GRN,
    ConvNeXtV2,
    ConvNeXtV2Block,
    NetworkSpec,
    adapt_pretrained,
    count_parameters,
    norm_keys,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures/convnextv2_timm_keys.json").read_text())
TIMM = FIXTURE["models"]
# timm's published parameter counts, in millions to 2 decimals: the `param_count` column of
# timm's results/results-imagenet.csv (convnextv2_atto.fcmae_ft_in1k: 3.71,
# convnextv2_tiny.fcmae_ft_in1k: 28.64; the HF model card of the atto says "Params (M): 3.7").
# The exact counts are the fixture's, summed from timm's shapes (and equal to what
# timm.create_model reports, see the fixture's "source").
PUBLISHED_M = {"convnextv2_atto": 3.71, "convnextv2_tiny": 28.64}
EXACT = {"convnextv2_atto": 3_708_400, "convnextv2_tiny": 28_635_496}


def keys_and_shapes(net: torch.nn.Module) -> list[list]:
    return [[k, list(v.shape)] for k, v in net.state_dict().items()]


def randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norms and GRN included, which start at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return net


# --------------------------------------------------------------------------- timm's keys


@pytest.mark.parametrize("name", list(TIMM))
def test_state_dict_is_timms(name: str) -> None:
    entry = TIMM[name]
    net = ConvNeXtV2(name.removeprefix("convnextv2_"), in_channels=3, num_classes=1000,
                     width=1.0)
    assert keys_and_shapes(net) == entry["state_dict"]  # same keys, same order, same shapes
    assert sum(math.prod(shape) for _, shape in entry["state_dict"]) == entry["param_count"]
    assert count_parameters(net) == entry["param_count"] == EXACT[name]
    assert round(count_parameters(net) / 1e6, 2) == PUBLISHED_M[name]
    assert "stages.3" in dict(net.named_modules())  # gradcam_layer("dl_us") names a module
    assert networks.gradcam_layer("dl_us") == "stages.3"


def test_norm_keys_are_every_layernorm_and_grn_parameter() -> None:
    net = ConvNeXtV2("atto", in_channels=3, num_classes=1000)
    expected = {k for k, _ in TIMM["convnextv2_atto"]["state_dict"]
                if k.startswith(("stem.1.", "head.norm.")) or ".downsample.0." in k
                or ".norm." in k or ".grn." in k}
    assert norm_keys(net) == expected  # what FedBN keeps local: all of them, nothing else


# --------------------------------------------------------------------------- forward = timm's


def reference_grn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  channels_last: bool) -> torch.Tensor:
    """timm.layers.grn.GlobalResponseNorm.forward, written out."""
    spatial, channel = ((1, 2), -1) if channels_last else ((2, 3), 1)
    shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
    gx = x.pow(2).sum(dim=spatial, keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=channel, keepdim=True) + 1e-6)
    return x + (bias.view(shape) + weight.view(shape) * (x * nx))


def reference_layernorm2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                          ) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def reference_block(block: ConvNeXtV2Block, x: torch.Tensor) -> torch.Tensor:
    """timm's ConvNeXtBlock (use_grn, no layer scale) in its NCHW 1×1-conv form."""
    c = x.shape[1]
    y = F.conv2d(x, block.conv_dw.weight, block.conv_dw.bias, padding=3, groups=c)
    y = reference_layernorm2d(y, block.norm.weight, block.norm.bias)
    mlp = block.mlp
    y = F.conv2d(y, mlp.fc1.weight.reshape(4 * c, c, 1, 1), mlp.fc1.bias)
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))  # exact GELU
    y = reference_grn(y, mlp.grn.weight, mlp.grn.bias, channels_last=False)
    y = F.conv2d(y, mlp.fc2.weight.reshape(c, 4 * c, 1, 1), mlp.fc2.bias)
    return x + y


def test_grn_is_timms_formula() -> None:
    x = torch.randn(3, 5, 6, 8)
    for channels_last, dim in ((True, 8), (False, 5)):
        grn = GRN(dim, channels_last=channels_last)
        assert torch.equal(grn(x), x)  # weight = bias = 0 at init: identity
        assert [k for k, _ in grn.named_parameters()] == ["weight", "bias"]
        with torch.no_grad():
            grn.weight.normal_()
            grn.bias.normal_()
        torch.testing.assert_close(grn(x), reference_grn(x, grn.weight, grn.bias,
                                                         channels_last))
        tiny = x * 1e-6  # ‖x‖ comparable to eps = 1e-6: the eps's place matters
        with torch.no_grad():
            grn.bias.zero_()
        torch.testing.assert_close(grn(tiny), reference_grn(tiny, grn.weight, grn.bias,
                                                            channels_last),
                                   rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("conv_mlp", [True, False])  # atto…nano / tiny, base
def test_block_forward_is_timms(conv_mlp: bool) -> None:
    block = randomised(ConvNeXtV2Block(12, conv_mlp)).eval()
    assert block.mlp.fc1.weight.ndim == (4 if conv_mlp else 2)
    for scale in (1.0, 1e-3):  # small activations: the LayerNorm / GRN eps (1e-6) matter
        x = torch.randn(2, 12, 9, 9) * scale
        with torch.no_grad():
            torch.testing.assert_close(block(x), reference_block(block, x),
                                       atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("variant", ["atto", "tiny"])
def test_network_forward_is_timms(variant: str) -> None:
    net = randomised(ConvNeXtV2(variant, in_channels=3, num_classes=5, width=0.125)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = F.conv2d(x, net.stem[0].weight, net.stem[0].bias, stride=4)
        y = reference_layernorm2d(y, net.stem[1].weight, net.stem[1].bias)
        for i, stage in enumerate(net.stages):
            if i > 0:  # LayerNorm2d, then the 2×2 stride-2 conv
                y = reference_layernorm2d(y, stage.downsample[0].weight, stage.downsample[0].bias)
                y = F.conv2d(y, stage.downsample[1].weight, stage.downsample[1].bias, stride=2)
            for block in stage.blocks:
                y = reference_block(block, y)
        y = reference_layernorm2d(y.mean(dim=(2, 3), keepdim=True), net.head.norm.weight,
                                  net.head.norm.bias).flatten(1)  # pool, then norm
        torch.testing.assert_close(net(x), F.linear(y, net.head.fc.weight, net.head.fc.bias),
                                   atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- adapt_pretrained


@pytest.mark.parametrize("variant", ["atto", "tiny"])
def test_timm_checkpoint_adapts_into_the_one_channel_one_logit_net(variant: str) -> None:
    file = randomised(ConvNeXtV2(variant, in_channels=3, num_classes=1000), seed=1)
    state = {k: v.clone() for k, v in file.state_dict().items()}  # stands in for a timm file
    net = NetworkSpec("dl_us", width=1.0, variant=variant).build(0)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    adapted, notes = adapt_pretrained("dl_us", net, state)
    net.load_state_dict(adapted, strict=True)
    loaded = net.state_dict()
    torch.testing.assert_close(loaded["stem.0.weight"],
                               state["stem.0.weight"].sum(dim=1, keepdim=True))
    for k in loaded:
        if k.startswith("head.fc."):
            assert torch.equal(loaded[k], initial[k])  # 1000 classes → our one logit
        elif k != "stem.0.weight":
            assert torch.equal(loaded[k], state[k]), k
    assert any("stem.0.weight" in n for n in notes)
    assert any("head.fc.weight" in n for n in notes)
    # a grey image through the summed stem = the same image in 3 channels through timm's
    x = torch.randn(2, 1, 32, 32)
    file.eval(), net.eval()
    with torch.no_grad():
        ours, timms = net.stages(net.stem(x)), file.stages(file.stem(x.repeat(1, 3, 1, 1)))
    assert float((ours - timms).abs().max() / timms.abs().max()) < 1e-5


def test_timm_checkpoint_loads_unchanged_into_timms_shape() -> None:
    file = randomised(ConvNeXtV2("atto", in_channels=3, num_classes=1000), seed=2)
    net = ConvNeXtV2("atto", in_channels=3, num_classes=1000)
    adapted, notes = adapt_pretrained("dl_us", net, {f"module.{k}": v for k, v in
                                                     file.state_dict().items()})
    assert notes == ["stripped the leading 'module.' (DataParallel) from the keys"]
    net.load_state_dict(adapted, strict=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in file.state_dict().items())


def test_checkpoint_of_another_variant_or_an_incomplete_one_is_refused() -> None:
    net = NetworkSpec("dl_us", variant="atto").build(0)
    femto = ConvNeXtV2("femto", in_channels=3, num_classes=1000).state_dict()
    with pytest.raises(ValueError, match=r"stem\.0\.weight"):
        adapt_pretrained("dl_us", net, femto)
    atto = ConvNeXtV2("atto", in_channels=3, num_classes=1000).state_dict()
    incomplete = {k: v for k, v in atto.items() if k != "stages.2.blocks.5.mlp.grn.weight"}
    with pytest.raises(ValueError, match=r"lacks: stages\.2\.blocks\.5\.mlp\.grn\.weight"):
        adapt_pretrained("dl_us", net, incomplete)
    with pytest.raises(ValueError, match=r"does not have: norm_pre\.weight"):
        adapt_pretrained("dl_us", net, {**atto, "norm_pre.weight": torch.ones(320)})
    with pytest.raises(ValueError, match="not a tensor"):
        adapt_pretrained("dl_us", net, {"state_dict": atto})  # nesting is the caller's
    with pytest.raises(ValueError, match="unknown model"):
        adapt_pretrained("vgg", net, atto)


def mri(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return resnet18(**{"spatial_dims": 3, "n_input_channels": 1, "num_classes": 1,
                       "widen_factor": 0.25, "conv1_t_stride": 2, "shortcut_type": "A",
                       **kwargs})


def test_medicalnet_checkpoint_adapts_into_dl_mri() -> None:
    file = mri(1, num_classes=2)
    with torch.no_grad():
        for v in file.state_dict().values():  # BN running statistics too
            v.add_(torch.rand_like(v.float()).to(v.dtype))
    state = {f"module.{k}": v.clone() for k, v in file.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.randn(128, 32, 2, 2, 2)  # MedicalNet's seg head
    state["module.conv_seg.1.weight"] = torch.ones(32)
    net = NetworkSpec("dl_mri", width=0.25).build(0)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    adapted, notes = adapt_pretrained("dl_mri", net, state)
    net.load_state_dict(adapted, strict=True)
    for k, v in net.state_dict().items():
        expected = initial[k] if k.startswith("fc.") else file.state_dict()[k]
        assert torch.equal(v, expected), k
    assert any("conv_seg.0.weight" in n for n in notes) and any("fc.weight" in n for n in notes)
    assert any("module." in n for n in notes)
    missing = {k: v for k, v in state.items() if k != "module.layer3.1.conv2.weight"}
    with pytest.raises(ValueError, match=r"layer3\.1\.conv2\.weight"):
        adapt_pretrained("dl_mri", net, missing)
    with pytest.raises(ValueError, match=r"layer5\.0\.conv1\.weight"):
        adapt_pretrained("dl_mri", net, {**state, "layer5.0.conv1.weight": torch.ones(1)})


def test_a_shortcut_b_resnet_is_refused_with_the_reason() -> None:
    # dl_mri is MedicalNet's ResNet-18 (shortcut type A: no downsample weights); a file of
    # MONAI's default type B carries downsample convolutions the network does not have
    state = mri(1, shortcut_type="B").state_dict()
    net = NetworkSpec("dl_mri", width=0.25).build(0)
    with pytest.raises(ValueError, match=r"layer2\.0\.downsample\.0\.weight.*shortcut type B"):
        adapt_pretrained("dl_mri", net, state)


def test_dsfr_state_is_taken_as_is() -> None:
    file = NetworkSpec("dsfr", width=0.0625).build(3)
    net = NetworkSpec("dsfr", width=0.0625).build(0)
    adapted, notes = adapt_pretrained("dsfr", net, file.state_dict())
    assert notes == []
    net.load_state_dict(adapted, strict=True)
    assert all(torch.equal(v, file.state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match=r"lacks: head\.weight"):  # no optional head here
        adapt_pretrained("dsfr", net, {k: v for k, v in file.state_dict().items()
                                       if k != "head.weight"})
