"""The three CNNs of the papers (PIPELINE.md), built the same way at every site and at the
server (same seed → same initial weights), plus the helpers the training engine needs:
which state entries are normalization layers (FedBN keeps them local) and the named
ReLU layers of the DSFR U-Net (its feature maps are DSFR's features).

- `dsfr`: paper 1's 2D segmentation U-Net: input 64×64×1; encoder widths 64-128-256-512 and
  a 1024 bottleneck, each block (Conv3×3 → GroupNorm(2 groups) → ReLU)×2, MaxPool between
  encoder blocks; decoder UpSampling ×2 → concat skip → (Conv3×3-GN-ReLU)×2; 1×1 conv to
  one logit (sigmoid in the loss). ReLU modules are named as Keras names activations in
  forward order (`activation`, `activation_1`, …), so the authors' layer "activation_9"
  is the second ReLU of the 1024-channel bottleneck.
- `dl_mri`: 3D ResNet18 from MONAI (`monai.networks.nets.resnet18`, 1 input channel, one
  logit), with a MedicalNet-style stem (conv1 stride 2, as the PIPELINE's "MedicalNet style"
  model; MONAI's own default is stride 1).
- `dl_us`: ConvNeXt V2 built here from the paper (Woo et al., 2023: depthwise 7×7 conv →
  LayerNorm → pointwise 4× MLP with GELU and Global Response Normalization → residual);
  variants atto/femto/pico/nano/tiny/base. timm is not installed in this project, so it is
  not timm's implementation; there are no pretrained weights (sites train from scratch).

`width` scales every model's channel counts (1.0 = the papers' sizes); tests and CPU runs
use small widths. Depends on torch (and MONAI for the ResNet), not on Flower.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

MODELS = ("dsfr", "dl_mri", "dl_us")
UNET_WIDTHS = (64, 128, 256, 512, 1024)
DSFR_LAYER = "activation_9"  # the authors' layer: the bottleneck's second ReLU
CONVNEXT_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # name: (depths, dims) — ConvNeXt V2 paper, Table 1 / official repository
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}


def scaled(channels: int, width: float, multiple: int = 2) -> int:
    """`channels × width`, rounded to a multiple of `multiple` (GroupNorm's 2 groups),
    at least `multiple`."""
    return max(multiple, round(channels * width / multiple) * multiple)


# --------------------------------------------------------------------------- DSFR U-Net


class UNet2D(nn.Module):
    """Paper 1's segmentation U-Net (see the module docstring)."""

    def __init__(self, width: float = 1.0, in_channels: int = 1, groups: int = 2) -> None:
        super().__init__()
        chans = [scaled(c, width, groups) for c in UNET_WIDTHS]
        self.activations = nn.ModuleDict()
        self.relu_width: dict[str, int] = {}  # ReLU name -> channels of its output
        self._count = 0
        self.encoder = nn.ModuleList()
        previous = in_channels
        for c in chans[:-1]:
            self.encoder.append(self._block(previous, c, groups))
            previous = c
        self.bottleneck = self._block(chans[-2], chans[-1], groups)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.decoder = nn.ModuleList()
        previous = chans[-1]
        for c in reversed(chans[:-1]):
            self.decoder.append(self._block(previous + c, c, groups))
            previous = c
        self.head = nn.Conv2d(previous, 1, kernel_size=1)
        self.channels = tuple(chans)

    def _block(self, cin: int, cout: int, groups: int) -> nn.ModuleList:
        layers = nn.ModuleList()
        for i in range(2):
            name = "activation" if self._count == 0 else f"activation_{self._count}"
            self._count += 1
            self.activations[name] = nn.ReLU()
            self.relu_width[name] = cout
            layers.append(nn.ModuleDict({
                "conv": nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1),
                "norm": nn.GroupNorm(groups, cout),
            }))
            layers[-1].relu_name = name  # type: ignore[assignment]
        return layers

    def _run(self, block: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for layer in block:
            x = self.activations[layer.relu_name](layer["norm"](layer["conv"](x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = self._run(block, x)
            skips.append(x)
            x = self.pool(x)
        x = self._run(self.bottleneck, x)
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            x = self._run(block, torch.cat([self.up(x), skip], dim=1))
        return self.head(x)

    def relu_names(self) -> list[str]:
        return list(self.activations)


def relu_channels(model: UNet2D, name: str) -> int:
    """Channels of the feature map a named ReLU produces (its DSFR feature count)."""
    if name not in model.relu_width:
        raise ValueError(f"unknown DSFR layer {name!r}; the U-Net's ReLUs are "
                         f"{', '.join(model.relu_names())}")
    return model.relu_width[name]


class FeatureHook:
    """Records the output of one named ReLU of the U-Net on every forward pass."""

    def __init__(self, model: UNet2D, name: str) -> None:
        if name not in model.activations:
            raise ValueError(f"unknown DSFR layer {name!r}; the U-Net's ReLUs are "
                             f"{', '.join(model.relu_names())}")
        self.output: torch.Tensor | None = None
        self._handle = model.activations[name].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.output = output.detach()

    def close(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------- ConvNeXt V2


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) tensor (ConvNeXt's channels_first)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2), on channels_last (N, H, W, C):
    Gx = ‖x‖₂ over H, W; Nx = Gx / mean_C(Gx); out = γ·(x·Nx) + β + x."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(x)))))
        x = x.permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:  # stochastic depth, per sample
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop_path
            x = x * keep / (1 - self.drop_path)
        return shortcut + x


class ConvNeXtV2(nn.Module):
    """ConvNeXt V2 classifier (one logit for a binary task)."""

    def __init__(self, variant: str = "atto", in_channels: int = 1, num_classes: int = 1,
                 width: float = 1.0, drop_path: float = 0.0) -> None:
        super().__init__()
        if variant not in CONVNEXT_VARIANTS:
            raise ValueError(f"unknown ConvNeXt V2 variant {variant!r}; known: "
                             f"{list(CONVNEXT_VARIANTS)}")
        depths, base = CONVNEXT_VARIANTS[variant]
        dims = [scaled(d, width) for d in base]
        self.downsample = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))])
        for i in range(3):
            self.downsample.append(nn.Sequential(
                LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for i, depth in enumerate(depths):
            self.stages.append(nn.Sequential(*[ConvNeXtV2Block(dims[i], rates[start + j])
                                               for j in range(depth)]))
            start += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample, self.stages, strict=True):
            x = stage(down(x))
        return self.head(self.norm(x.mean(dim=(-2, -1))))


# --------------------------------------------------------------------------- factory


@dataclass(frozen=True)
class NetworkSpec:
    """What a site needs to build the same network as every other site."""

    model: str
    width: float = 1.0
    variant: str = "atto"  # ConvNeXt V2 size (dl_us)
    drop_path: float = 0.0  # ConvNeXt V2 stochastic depth

    def build(self, seed: int = 0) -> nn.Module:
        """The network with its seeded initial weights (the same everywhere)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.model == "dsfr":
                return UNet2D(width=self.width)
            if self.model == "dl_mri":
                from monai.networks.nets import resnet18

                return resnet18(spatial_dims=3, n_input_channels=1, num_classes=1,
                                widen_factor=self.width, conv1_t_stride=2)
            if self.model == "dl_us":
                return ConvNeXtV2(self.variant, width=self.width, drop_path=self.drop_path)
        raise ValueError(f"unknown model {self.model!r}; known: {list(MODELS)}")


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, LayerNorm2d, GRN)


def norm_keys(model: nn.Module) -> set[str]:
    """State-dict keys of normalization layers (BatchNorm/GroupNorm/LayerNorm/GRN, with
    BatchNorm's running statistics): what FedBN keeps local at each site."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            for name, _ in list(module.named_parameters(recurse=False)) + list(
                    module.named_buffers(recurse=False)):
                keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def state_arrays(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The model's state dict (detached, on CPU) without the `skip` keys."""
    skip = set(skip)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in skip}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gradcam_layer(model: str) -> str:
    """The layer Grad-CAM looks at: the last ResNet stage (as paper 2), the last ConvNeXt
    stage."""
    return {"dl_mri": "layer4", "dl_us": "stages.3"}[model]
