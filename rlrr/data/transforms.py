"""Input transforms of the reference recipes (docs/method.md, section 6), on uint8 images.

Three stages, so that loader workers pass uint8 (4x less than float32 between processes) and the
random parts run vectorised over a batch:
  ``Recipe.resize``  per sample: bicubic resize to the recipe's size (skipped when the shards already
                     hold that size, as ``make_shards --image-size`` writes them);
  ``Recipe.augment`` per batch: random crop + flip (train) or center crop (eval), uint8 NCHW;
  ``normalize``      per batch, where the batch lands (the GPU in training): float, mean/std.
VTAB: resize to 224 x 224. FGVC: resize to 256 x 256, random crop 224 (eval: center crop 224).
Both flip at random in training when asked (the reference's FGVC recipe does; data.flip in configs/).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..config_types import RecipeName, Stats

MEAN_STD: dict[Stats, tuple] = {
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the reference's VTAB/FGVC normalisation
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class Recipe:
    def __init__(self, recipe: RecipeName, train: bool, flip: bool = False, image_size: int = 224):
        self.recipe, self.train, self.image_size = recipe, train, image_size
        self.flip = train and flip
        side = image_size if recipe == "vtab" else round(image_size * 256 / 224)
        self.size = (side, side)

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == self.size:
            return image
        out = F.interpolate(image[None].float(), size=self.size, mode="bicubic", antialias=True, align_corners=False)
        return out[0].round_().clamp_(0, 255).to(torch.uint8)

    def augment(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        n, s = images.shape[0], self.image_size
        h, w = images.shape[-2:]
        if (h, w) != (s, s):
            if self.train:  # a random crop per image
                top = torch.randint(0, h - s + 1, (n,), generator=generator).tolist()
                left = torch.randint(0, w - s + 1, (n,), generator=generator).tolist()
                images = torch.stack([img[:, y:y + s, x:x + s] for img, y, x in zip(images, top, left)])
            else:
                y, x = (h - s) // 2, (w - s) // 2
                images = images[:, :, y:y + s, x:x + s]
        if self.flip:  # flip the chosen images only (torch.where over a flipped copy of all cost 3x more)
            flipped = (torch.rand(n, generator=generator) < 0.5).nonzero().squeeze(1).to(images.device)
            images = images.index_copy(0, flipped, images[flipped].flip(-1))
        return images.contiguous()


def normalize(images: torch.Tensor, stats: Stats = "half") -> torch.Tensor:
    """uint8 NCHW batch -> float32, scaled to [0, 1] and standardised with ``stats``."""
    mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in MEAN_STD[stats])
    return images.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)  # (x / 255 - mean) / std, in place
