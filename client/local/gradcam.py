"""Grad-CAM of the deep models' scores at a site (`query.train_score`): per patient a PNG
overlay of the positive logit's class-activation map on the patient's input (for a 3-D
crop its axial slice with the most tumour), written at the site and never sent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.local.training_data import ModelData
from neural import networks
from shared.training_params import TrainParams


def gradcam(data: ModelData, p: TrainParams, nets: dict[str, nn.Module], folder: Path,
            count: int, device: torch.device) -> int:
    """Grad-CAM (MONAI) of the positive logit for the first `count` patients (ids in order),
    each from the model that scored it; PNG overlays written at the site, never sent."""
    if count <= 0 or p.model == "dsfr" or not len(data.patients):
        return 0
    from monai.visualize import GradCAM
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in np.argsort(data.patients)[:count]:
        unit = (f"f{int(data.folds[index])}" if data.folds is not None else p.units[0])
        net = nets[unit]
        net.eval()
        sample = int(np.flatnonzero(data.owner == index)[0])
        x = torch.from_numpy(data.x[sample:sample + 1]).to(device)
        with torch.enable_grad():
            cam = GradCAM(nn_module=net, target_layers=networks.gradcam_layer(p.model))
            heat = cam(x=x, class_idx=0).detach().float().cpu().numpy()[0, 0]
        image = data.x[sample, 0]
        if image.ndim == 3:  # the axial slice with the most tumour
            z = int(np.argmax(data.mask[sample, 0].reshape(image.shape[0], -1).sum(axis=1)))
            image, heat = image[z], heat[z]
        Image.fromarray(_overlay(image, heat)).resize((256, 256)).save(
            folder / f"{data.patients[index]}.png")
        written += 1
    return written


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    lo, hi = np.percentile(image, [1, 99])
    gray = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    blend = 0.6 * np.repeat(gray[..., None], 3, axis=-1) + 0.4 * colour
    return (np.clip(blend, 0, 1) * 255).astype(np.uint8)
