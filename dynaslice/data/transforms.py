"""Augmentation applied to a whole uint8 batch at once, plus torchvision pipelines for folders.

Small-image transforms take `(images_uint8 [B, C, H, W], generator)` and return normalised float
images. All randomness comes from the generator the loader passes in, which is seeded from
(seed, epoch, batch index, rank): a resumed run sees bit-identical batches, and no global RNG is
touched. Each sample draws its own crop offset and flip.

Multi-view consistency training (MvCo) needs two augmented views of every image: call the train
transform twice with the same generator (its state advances, so the views differ), or wrap it in
`MultiView`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1] -> (x - mean) / std, per channel."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got {images.dtype}")
    mean = mean.to(images.device)
    std = std.to(images.device)
    return images.float().div_(255).sub_(mean).div_(std)


class EvalTransform:
    """To float and normalise; nothing random (the generator argument is ignored)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _normalize(images, self.mean, self.std)

    def __repr__(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"EvalTransform(mean={mean}, std={std})"


class TrainTransform:
    """Random crop from a zero-padded image + random horizontal flip + normalise, per sample.

    The standard CIFAR recipe (pad 4, crop 32, flip). `crop_padding=None` picks 4 for images of
    32 px and more and 2 for smaller ones (Fashion-MNIST's 28 px objects fill the frame, so a
    4-pixel shift would cut off too much). Vectorised: one pad, then a single gather whose row
    and column indices encode every sample's offset and flip.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int | None = None,
        hflip: bool = True,
    ) -> None:
        if crop_padding is not None and crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.crop_padding = crop_padding
        self.hflip = hflip

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.crop_padding
        if p is None:
            p = 4 if min(h, w) >= 32 else 2
        # Random numbers are drawn on the CPU generator, then moved: the same on any device.
        dy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b, 1), generator=generator)
        cols = torch.arange(w).expand(b, w)
        if self.hflip:
            flip = torch.rand(b, 1, generator=generator) < 0.5
            cols = torch.where(flip, w - 1 - cols, cols)
        rows = (dy + torch.arange(h)).to(images.device)  # [B, H], rows of the padded image
        cols = (dx + cols).to(images.device)  # [B, W]
        padded = F.pad(images, (p, p, p, p))  # zeros: black, as torchvision's RandomCrop(fill=0)
        bi = torch.arange(b, device=images.device).view(b, 1, 1, 1)
        ci = torch.arange(c, device=images.device).view(1, c, 1, 1)
        crops = padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
        return _normalize(crops, self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(mean={self.mean.flatten().tolist()}, "
            f"std={self.std.flatten().tolist()}, crop_padding={self.crop_padding}, "
            f"hflip={self.hflip})"
        )


class MultiView:
    """Apply a random transform `views` times to the same batch: output [views, B, C, H, W].

    The views differ because the generator's state advances between calls; they are still a
    pure function of the generator's seed, so resumed runs reproduce them. Used by MvCo.
    """

    def __init__(self, transform: BatchTransform, views: int = 2) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.transform = transform
        self.views = views

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.stack([self.transform(images, generator) for _ in range(self.views)])

    def __repr__(self) -> str:
        return f"MultiView({self.transform!r}, views={self.views})"


def imagefolder_transforms(train: bool, size: int = 224) -> Callable:
    """The DS-Net++ ImageNet recipe as torchvision.transforms.v2 pipelines (PIL image in).

    Train: RandomResizedCrop (bicubic) + flip + RandAugment(m=9) + normalise + RandomErasing(0.2).
    Eval: resize to size/0.875 (256 for 224), center crop, normalise.
    """
    from torchvision.transforms import InterpolationMode, v2

    bicubic = InterpolationMode.BICUBIC
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(size, interpolation=bicubic, antialias=True),
                v2.RandomHorizontalFlip(),
                # RandAugment's affine ops support only nearest/bilinear on tensors.
                v2.RandAugment(magnitude=9, interpolation=InterpolationMode.BILINEAR),
                *to_float,
                v2.RandomErasing(p=0.2),
            ]
        )
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(size / 0.875), interpolation=bicubic, antialias=True),
            v2.CenterCrop(size),
            *to_float,
        ]
    )
