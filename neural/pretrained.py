"""Pretrained weights from a local file (`pretrained=<model>=PATH`), never downloaded.

A consortium puts the same file at every training site and at the coordinator before a
study (README, "Pretrained weights"). The setup round asks each site for the file's sha256
(a hash of public weights, not patient data); the server compares them with its own copy,
starts the federated model from it (round-0 weights = the file) and writes the hash into
`provenance`. In round 1 each site checks that the weights it received are its file's.

At the server PATH is absolute or relative to the working directory (`resolve`). At a
site it is a file inside the site folder or the folder the site's own site.yaml names
(`pretrained_dir`), relative to one of them or absolute within one of them
(`client.stages.training_round.pretrained_file`, through `client.site.files`): a PATH that leads
anywhere else is refused with one answer whether or not the file exists, and never opened.
Only weight files are read (`.pt`, `.pth`, `.bin`, `.ckpt`, `.safetensors`): the server
cannot use the setup round to learn the hash of any other file at a site, and errors never
quote a file's content.

The one module of shared/ that reads a file: the coordinator and every site must read the
same public weights file the same way (it holds no patient data).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from neural import networks

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def resolve(path: str, base: Path) -> Path:
    """PATH as the coordinator reads its own copy (relative paths against `base`); only
    weight files. A site never uses this: see the module's docstring."""
    target = Path(path).expanduser()
    if target.suffix.lower() not in SUFFIXES:
        raise ValueError(f"pretrained file {path!r}: not a weights file (one of "
                         f"{', '.join(SUFFIXES)})")
    return target if target.is_absolute() else base / target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a safetensors file (with the `safetensors` package), or
    a torch file read with `weights_only=True` (no code runs); a `state_dict`, `model` or
    `module` entry holding the weights is unwrapped."""
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ValueError(f"pretrained file {path.name}: reading .safetensors needs the "
                             "`safetensors` package at this site") from err
        try:
            return dict(load_file(str(path)))
        except Exception as err:  # a header's error can quote it: the kind only
            raise ValueError(f"pretrained file {path.name}: unreadable as safetensors "
                             f"({type(err).__name__})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: a reason, not a traceback
        # the unpickler's message can quote the file (a refused global's name): its kind only
        raise ValueError(f"pretrained file {path.name}: unreadable as torch weights "
                         f"({type(err).__name__})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ValueError(f"pretrained file {path.name}: holds no state dict of tensors")
    return state


def load_into(model: str, net: nn.Module, path: Path) -> list[str]:
    """Load the file into `net` (neural.networks.adapt_pretrained: input channels summed,
    a classification head of another shape kept from the initialisation); returns the
    adaptation notes. A file for another network raises ValueError naming its keys."""
    adapted, notes = networks.adapt_pretrained(model, net, read_state_dict(path))
    missing, unexpected = net.load_state_dict(adapted, strict=False)
    if unexpected:
        raise ValueError(f"pretrained file {path.name}: unknown keys {unexpected[:3]}")
    return notes + ([f"kept from the initialisation: {', '.join(missing)}"] if missing else [])
