"""The view bank: augmented copies of the training images, each labelled by the teacher itself.

A cached teacher target is only right for the input the teacher saw. So instead of augmenting
online against logits of the original image, the recover pass draws ``views`` copies of every
training sample once (copy 0 is the sample itself), runs the teacher on every copy, and trains on
the bank: every augmentation, mixing two images included, has its own exact teacher target
(a consistent teacher), and the teacher still runs once per cached sample.

Augmentations of one copy, on NCHW images (applied in this order, each drawn per sample from one
seeded ``torch.Generator``):

    random-resized crop   a box of area fraction a ~ U(crop_scale, 1) and aspect ratio
                          r ~ exp(U(log 3/4, log 4/3)) (width fraction sqrt(a r), height
                          sqrt(a / r), both clipped to 1) at a uniform position, resampled
                          bilinearly to H x W (affine grid; ``crop_scale`` 1 disables it);
    flip                  mirror left-right with probability 1/2;
    colour jitter         on the normalised input, factors c, s ~ U(1 - j, 1 + j), b ~ U(-j, j):
                          contrast  x <- m + c (x - m), m the image mean;
                          saturation x <- g + s (x - g), g the per-pixel channel mean (3 channels);
                          brightness x <- x + b std(x);
    mixup (alpha_m > 0)   x <- lam x + (1 - lam) x', lam ~ Beta(alpha_m, alpha_m), x' another
                          copy of the batch;
    cutmix (alpha_c > 0)  the box of area fraction 1 - lam (lam ~ Beta(alpha_c, alpha_c)) at a
                          uniform centre is pasted from x'. With both on, each copy takes one of
                          the two with probability 1/2.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    views: int  # copies per sample, the first being the sample itself
    crop_scale: float  # smallest area fraction of a random-resized crop (1: no crops)
    flip: bool
    jitter: float  # 0: no colour jitter
    mixup: float  # Beta parameter; 0: off
    cutmix: float  # Beta parameter; 0: off

    @property
    def augments(self) -> bool:
        return self.crop_scale < 1 or self.flip or self.jitter > 0 or self.mixup > 0 or self.cutmix > 0


def is_image(sample_shape: tuple[int, ...]) -> bool:
    """C x H x W with 1, 3 or 4 channels and at least 4 x 4 pixels."""
    return len(sample_shape) == 3 and sample_shape[0] in (1, 3, 4) and min(sample_shape[1:]) >= 4


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _crop_flip(x: torch.Tensor, cfg: ViewConfig, generator: torch.Generator) -> torch.Tensor:
    n = len(x)
    area = _uniform(n, cfg.crop_scale, 1.0, generator) if cfg.crop_scale < 1 else torch.ones(n)
    ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), generator)) if cfg.crop_scale < 1 else torch.ones(n)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    # Box centre in normalised [-1, 1] coordinates, so that the box stays inside the image.
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    sign = torch.ones(n)
    if cfg.flip:
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([width * sign, zero, cx], 1), torch.stack([zero, height, cy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    n = len(x)
    shape = (n, 1, 1, 1)
    contrast = _uniform(n, 1 - strength, 1 + strength, generator).reshape(shape)
    saturation = _uniform(n, 1 - strength, 1 + strength, generator).reshape(shape)
    brightness = _uniform(n, -strength, strength, generator).reshape(shape)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + contrast * (x - mean)
    if x.shape[1] == 3:
        grey = x.mean(dim=1, keepdim=True)
        x = grey + saturation * (x - grey)
    return x + brightness * x.std(dim=(1, 2, 3), keepdim=True)


def _mix(x: torch.Tensor, cfg: ViewConfig, generator: torch.Generator, rng: np.random.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    partner = x[torch.randperm(n, generator=generator)]
    use_cutmix = torch.zeros(n, dtype=torch.bool)
    if cfg.mixup > 0 and cfg.cutmix > 0:
        use_cutmix = torch.rand(n, generator=generator) < 0.5
    elif cfg.cutmix > 0:
        use_cutmix = torch.ones(n, dtype=torch.bool)
    alpha = np.where(use_cutmix.numpy(), cfg.cutmix or 1.0, cfg.mixup or 1.0)
    lam = torch.from_numpy(rng.beta(alpha, alpha).astype(np.float32))
    mixed = lam.reshape(n, 1, 1, 1) * x + (1 - lam.reshape(n, 1, 1, 1)) * partner
    # CutMix: a box of area fraction 1 - lam, centred uniformly, clipped to the image.
    cut = torch.sqrt(1 - lam)
    bh, bw = (cut * h).round().long(), (cut * w).round().long()
    cy = (torch.rand(n, generator=generator) * h).long()
    cx = (torch.rand(n, generator=generator) * w).long()
    rows, cols = torch.arange(h)[None, :], torch.arange(w)[None, :]
    in_rows = (rows >= (cy - bh // 2)[:, None]) & (rows < (cy - bh // 2 + bh)[:, None])
    in_cols = (cols >= (cx - bw // 2)[:, None]) & (cols < (cx - bw // 2 + bw)[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    pasted = torch.where(box, partner, x)
    return torch.where(use_cutmix.reshape(n, 1, 1, 1), pasted, mixed)


def make_views(x: np.ndarray, cfg: ViewConfig, seed: int, batch_size: int = 64) -> np.ndarray:
    """The bank [n * views, ...]: rows ``v * n + i`` hold copy ``v`` of sample ``i`` (copy 0 is
    ``x`` itself). Non-image samples, or ``views`` 1, give ``x`` unchanged."""
    if cfg.views == 1 or not cfg.augments or not is_image(tuple(x.shape[1:])):
        return x
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)  # Beta draws (torch's Beta takes no generator)
    bank = np.empty((cfg.views * len(x), *x.shape[1:]), dtype=np.float32)
    bank[:len(x)] = x
    with torch.no_grad():
        for v in range(1, cfg.views):
            for start in range(0, len(x), batch_size):
                view = torch.from_numpy(x[start:start + batch_size])
                if cfg.crop_scale < 1 or cfg.flip:
                    view = _crop_flip(view, cfg, generator)
                if cfg.jitter > 0:
                    view = _jitter(view, cfg.jitter, generator)
                if (cfg.mixup > 0 or cfg.cutmix > 0) and len(view) > 1:
                    view = _mix(view, cfg, generator, rng)
                bank[v * len(x) + start: v * len(x) + start + len(view)] = view.numpy()
    return bank
