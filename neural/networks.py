"""The three CNNs of the papers (see the README), built the same way at every site and at the
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
  logit) built as MedicalNet's ResNet-18 (conv1 stride 2 and shortcut type A — identity
  with zero-padded channels, no downsample weights; MONAI's defaults are stride 1 and B),
  so a MedicalNet state dict loads (its `conv_seg` head dropped).
- `dl_us`: ConvNeXt V2 (Woo et al., 2023: depthwise 7×7 conv → LayerNorm → pointwise 4×
  MLP with GELU and Global Response Normalization → residual), written here to timm's
  `timm.models.convnext.ConvNeXt` with its `convnextv2_*` settings (timm itself is not a
  dependency): the same modules, parameter names and shapes (`stem.*`,
  `stages.{i}.downsample.*`, `stages.{i}.blocks.{j}.{conv_dw,norm,mlp.fc1,mlp.grn,mlp.fc2}`,
  `head.norm`, `head.fc`) and the same forward, so a timm checkpoint of the variant loads
  unchanged with `load_state_dict(strict=True)` at width 1.0 (3 input channels, 1000
  classes), or through `adapt_pretrained` into our 1-channel, 1-logit network; variants
  atto/femto/pico/nano (timm's 1×1-conv MLP) and tiny/base (Linear MLP).

`adapt_pretrained` turns a checkpoint's state dict (timm ConvNeXt V2, MedicalNet ResNet-18,
our U-Net) into one for our networks, refusing a file for another model or variant.

`width` scales every model's channel counts (1.0 = the papers' sizes); tests and CPU runs
use small widths. Depends on torch (and MONAI for the ResNet), not on Flower.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from shared.schema import TRAIN_MODELS

MODELS = TRAIN_MODELS  # shared/schema.py declares the models
UNET_WIDTHS = (64, 128, 256, 512, 1024)
DSFR_LAYER = "activation_9"  # the authors' layer: the bottleneck's second ReLU
CONVNEXT_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # name: (depths, dims) — timm's convnextv2_* (timm/models/convnext.py) = the paper's
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}
CONVNEXT_CONV_MLP = frozenset({"atto", "femto", "pico", "nano"})  # timm's conv_mlp=True


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
# timm's `timm.models.convnext.ConvNeXt` with the `convnextv2_*` settings (use_grn=True,
# ls_init_value=None, norm_eps=None → every LayerNorm eps 1e-6, patch stem, avg-pool
# NormMlpClassifierHead without hidden layer, head_norm_first=False); module and parameter
# names are timm's, so `state_dict()` keys and shapes are those of timm's model.


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over the channels of an (N, C, H, W) tensor (eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2; timm's GlobalResponseNorm, params
    `weight` = γ and `bias` = β of shape (C,)): Gx = ‖x‖₂ over the spatial axes,
    Nx = Gx / (mean_C(Gx) + eps), out = x + β + γ·(x·Nx). Channels last (N, H, W, C) by
    default, channels first (N, C, H, W) with `channels_last=False`."""

    def __init__(self, dim: int, eps: float = 1e-6, channels_last: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.channels_last = channels_last
        self._spatial, self._channel, self._shape = ((1, 2), -1, (-1,)) \
            if channels_last else ((2, 3), 1, (-1, 1, 1))  # (C,) broadcast over the rest
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _grn(x, self.weight, self.bias, self.eps, self._spatial, self._channel,
                    self._shape)


def _grn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
         spatial: tuple[int, int], channel: int, shape: tuple[int, ...]) -> torch.Tensor:
    gx = x.norm(p=2, dim=spatial, keepdim=True)
    nx = gx / (gx.mean(dim=channel, keepdim=True) + eps)
    return x + torch.addcmul(bias.view(shape), weight.view(shape), x * nx)


class GRNMlp(nn.Module):
    """timm's GlobalResponseNormMlp: fc1 → GELU → GRN → fc2, with nn.Linear on channels-last
    input or, with `use_conv`, 1×1 convolutions on (N, C, H, W) input."""

    def __init__(self, dim: int, hidden: int, use_conv: bool) -> None:
        super().__init__()
        self.use_conv = use_conv
        layer = partial(nn.Conv2d, kernel_size=1) if use_conv else nn.Linear
        self.fc1 = layer(dim, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden, channels_last=not use_conv)
        self.fc2 = layer(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.grn(self.act(self.fc1(x))))

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The same function on (N, H, W, C) input. With 1×1 convs it applies their weights
        as nn.Linear matrices: equal to timm's conv form up to float rounding, and faster
        on CPU (the speed of the pre-timm implementation)."""
        if not self.use_conv:
            return self(x)
        x = F.gelu(F.linear(x, self.fc1.weight.flatten(1), self.fc1.bias))
        x = _grn(x, self.grn.weight, self.grn.bias, self.grn.eps, (1, 2), -1, (-1,))
        return F.linear(x, self.fc2.weight.flatten(1), self.fc2.bias)


class ConvNeXtV2Block(nn.Module):
    """timm's ConvNeXtBlock with use_grn=True and no layer scale: depthwise 7×7 conv →
    LayerNorm → GRN MLP (4×) → stochastic depth → + input. With `conv_mlp` (timm's
    atto…nano) its layers are timm's LayerNorm2d and 1×1 convs, otherwise (tiny, base)
    nn.LayerNorm and nn.Linear; the forward computes both channels last (equal up to float
    rounding to timm's (N, C, H, W) conv form, which is slower on CPU)."""

    def __init__(self, dim: int, conv_mlp: bool, drop_path: float = 0.0) -> None:
        super().__init__()
        self.use_conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim) if conv_mlp else nn.LayerNorm(dim, eps=1e-6)
        self.mlp = GRNMlp(dim, 4 * dim, use_conv=conv_mlp)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        # Channels last for both forms: LayerNorm2d is this layer_norm between permutes, and
        # the conv MLP runs as its Linear equivalent (GRNMlp.forward_channels_last).
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.norm.normalized_shape, self.norm.weight, self.norm.bias,
                         self.norm.eps)
        x = self.mlp.forward_channels_last(x).permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:  # stochastic depth (timm's DropPath)
            keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1 - self.drop_path)
            x = x * keep / (1 - self.drop_path)
        return x + shortcut


class ConvNeXtStage(nn.Module):
    """timm's ConvNeXtStage: `downsample` (LayerNorm2d → 2×2 stride-2 conv; nothing in the
    first stage) then `blocks`."""

    def __init__(self, cin: int, cout: int, depth: int, conv_mlp: bool, downsample: bool,
                 drop_path: list[float]) -> None:
        super().__init__()
        self.downsample: nn.Module = nn.Sequential(
            LayerNorm2d(cin), nn.Conv2d(cin, cout, kernel_size=2, stride=2)) if downsample \
            else nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtV2Block(cout, conv_mlp, drop_path[j])
                                      for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class NormHead(nn.Module):
    """timm's NormMlpClassifierHead as ConvNeXt uses it: global average pool → LayerNorm2d
    (`norm`) → flatten → Linear (`fc`)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean(dim=(2, 3), keepdim=True)).flatten(1))


class ConvNeXtV2(nn.Module):
    """ConvNeXt V2 classifier with timm's structure and parameter names (one logit for a
    binary task by default). `width` scales the channels (1.0 = timm's shapes)."""

    def __init__(self, variant: str = "atto", in_channels: int = 1, num_classes: int = 1,
                 width: float = 1.0, drop_path: float = 0.0) -> None:
        super().__init__()
        if variant not in CONVNEXT_VARIANTS:
            raise ValueError(f"unknown ConvNeXt V2 variant {variant!r}; known: "
                             f"{list(CONVNEXT_VARIANTS)}")
        depths, base = CONVNEXT_VARIANTS[variant]
        conv_mlp = variant in CONVNEXT_CONV_MLP
        dims = [scaled(d, width) for d in base]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4),
                                  LayerNorm2d(dims[0]))
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        stages, start, previous = [], 0, dims[0]
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            stages.append(ConvNeXtStage(previous, dim, depth, conv_mlp, downsample=i > 0,
                                        drop_path=rates[start:start + depth]))
            start, previous = start + depth, dim
        self.stages = nn.Sequential(*stages)
        self.head = NormHead(dims[-1], num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:  # timm's _init_weights (head_init_scale 1)
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


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
                                widen_factor=self.width, conv1_t_stride=2,
                                shortcut_type="A")
            if self.model == "dl_us":
                return ConvNeXtV2(self.variant, width=self.width, drop_path=self.drop_path)
        raise ValueError(f"unknown model {self.model!r}; known: {list(MODELS)}")



def network_of(p: Any) -> NetworkSpec:
    """The network a training's parameters describe (shared.training_params.TrainParams, or
    the server's training plan): model, width, ConvNeXt V2 variant."""
    return NetworkSpec(p.model, width=float(p.width), variant=p.variant)


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


# --------------------------------------------------------------------------- pretrained weights

# The classification head of each model: kept from our initialisation when the checkpoint
# has none or one of another shape (ImageNet's 1000 classes, MedicalNet's segmentation).
PRETRAINED_HEADS: dict[str, tuple[str, ...]] = {"dl_us": ("head.fc.",), "dl_mri": ("fc.",),
                                                "dsfr": ()}


def adapt_pretrained(model: str, net: nn.Module, state: Mapping[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A checkpoint's state dict turned into one that loads with `strict=True` into `net`
    (the `model` network as built here), and notes on what was adapted. Pure: the caller
    reads the file and unwraps timm's `state_dict` / `model` nesting.

    - every model: a leading `module.` (DataParallel, as MedicalNet's files) is stripped;
    - `dl_us` (a timm ConvNeXt V2 checkpoint: 3 input channels, 1000 classes): a 3-channel
      stem conv becomes the network's 1 channel by summing over the input channels (timm's
      `adapt_input_conv` for in_chans=1); a `head.fc.*` of another shape is dropped;
    - `dl_mri` (a MedicalNet ResNet-18 into MONAI's resnet18, same names): `conv_seg.*`
      (MedicalNet's segmentation head) and an `fc.*` of another shape are dropped;
    - `dsfr` (our own U-Net's state dict): nothing is adapted.

    A dropped or absent head, and absent BatchNorm `num_batches_tracked` counters, are
    taken from `net`'s current (initial) state. Any other key the network does not have or
    with another shape, and any other network key the checkpoint lacks, is a ValueError
    that names the first keys (a file for another model or variant must not half-load)."""
    if model not in PRETRAINED_HEADS:
        raise ValueError(f"unknown model {model!r}; known: {list(MODELS)}")
    ours = net.state_dict()
    head = PRETRAINED_HEADS[model]
    notes: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is not a tensor (a nested checkpoint? "
                             "pass its 'state_dict' or 'model')")
        name = key.removeprefix("module.")
        if name in out:
            raise ValueError(f"checkpoint has {name!r} both with and without 'module.'")
        out[name] = value
    if any(k.startswith("module.") for k in state):
        notes.append("stripped the leading 'module.' (DataParallel) from the keys")

    def shape(k: str) -> tuple[int, ...]:
        return tuple(out[k].shape)

    if model == "dl_us":
        stem = "stem.0.weight"
        if stem in out and stem in ours and out[stem].ndim == 4 and shape(stem)[1] == 3 \
                and ours[stem].shape[1] == 1 and shape(stem)[2:] == tuple(ours[stem].shape[2:]):
            w = out[stem]
            out[stem] = w.float().sum(dim=1, keepdim=True).to(w.dtype)
            notes.append(f"{stem}: 3 input channels summed into 1 {tuple(w.shape)} -> "
                         f"{shape(stem)} (timm's adapt_input_conv)")
    if model == "dl_mri":
        extra = sorted(k for k in out if k.startswith("conv_seg."))
        for k in extra:
            del out[k]
        if extra:
            notes.append(f"dropped MedicalNet's segmentation head: {', '.join(extra)}")
    dropped = [k for k in out if head and k.startswith(head) and k in ours
               and shape(k) != tuple(ours[k].shape)]
    for k in dropped:
        notes.append(f"{k}: checkpoint's {shape(k)} dropped, the network's "
                     f"{tuple(ours[k].shape)} kept from initialisation")
        del out[k]

    def listing(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" … ({len(keys)} in all)" if len(keys) > 5 else "")

    unknown = [k for k in out if k not in ours]
    if unknown:
        hint = ""
        if model == "dl_mri" and all(".downsample." in k for k in unknown):
            hint = (" (this file's ResNet-18 has shortcut type B, MONAI's default, with "
                    "downsample convolutions; dl_mri is MedicalNet's ResNet-18, type A)")
        raise ValueError(f"{model}: checkpoint keys the network does not have: "
                         f"{listing(unknown)}{hint}")
    wrong = [f"{k} {shape(k)} vs {tuple(ours[k].shape)}" for k in out
             if shape(k) != tuple(ours[k].shape)]
    if wrong:
        raise ValueError(f"{model}: checkpoint shapes differ from the network's (another "
                         f"variant or width?): {listing(wrong)}")
    missing = [k for k in ours if k not in out and not (head and k.startswith(head))
               and not k.endswith(".num_batches_tracked")]
    if missing:
        hint = ""
        if model == "dl_us" and all(k.startswith("head.") for k in missing):
            hint = " (a timm FCMAE pre-training checkpoint has no head.norm; use a fine-tuned one)"
        raise ValueError(f"{model}: network keys the checkpoint lacks: {listing(missing)}{hint}")
    absent = [k for k in ours if k not in out and k not in dropped]
    counters = [k for k in absent if k.endswith(".num_batches_tracked")]
    if len(absent) > len(counters):
        notes.append("not in the checkpoint, kept from initialisation: "
                     + ", ".join(k for k in absent if k not in counters))
    if counters:
        notes.append(f"{len(counters)} BatchNorm num_batches_tracked counters not in the "
                     "checkpoint, kept from initialisation")
    return {k: out[k] if k in out else ours[k].clone() for k in ours}, notes
