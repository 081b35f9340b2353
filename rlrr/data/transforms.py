"""Input transforms of the reference recipes (docs/method.md, section 6), on uint8 images.

Three stages, so that loader workers pass uint8 (4x less than float32 between processes) and the
random parts run vectorised over a batch:
  ``Recipe.resize``  per sample: bicubic resize to the recipe's size (skipped when the shards already
                     hold that size, as ``make_shards --image-size`` writes them);
  ``Recipe.augment`` per batch: random crop + flip (train) or center crop (eval), uint8 NCHW; it is
                     ``draw`` (the random parts) then ``apply``, so that a loader worker can draw
                     and the device apply (data.decode: device);
  ``normalize``      per batch, where the batch lands (the GPU in training): float, mean/std.
VTAB: resize to 224 x 224. FGVC: resize to 256 x 256, random crop 224 (eval: center crop 224).
Both flip at random in training when asked (the reference's FGVC recipe does; data.flip in configs/).
"""
import functools
from typing import NamedTuple, Optional

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

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> "Draw":
        """The random parts of ``augment`` for ``n`` resized images: drawn where the samples are read
        (a loader worker), applied where the images are (the GPU, when it decodes them)."""
        (h, w), s = self.size, self.image_size
        top = left = flip = None
        if self.train and (h, w) != (s, s):  # a random crop per image
            top = torch.randint(0, h - s + 1, (n,), generator=generator)
            left = torch.randint(0, w - s + 1, (n,), generator=generator)
        if self.flip:
            flip = torch.rand(n, generator=generator) < 0.5
        return Draw(top, left, flip)

    def apply(self, images: torch.Tensor, draw: "Draw") -> torch.Tensor:
        """Crop (random where drawn, else center) and flip resized uint8 NCHW images."""
        s = self.image_size
        h, w = images.shape[-2:]
        if draw.top is not None:
            images = torch.stack([img[:, y:y + s, x:x + s]
                                  for img, y, x in zip(images, draw.top.tolist(), draw.left.tolist())])
        elif (h, w) != (s, s):
            y, x = (h - s) // 2, (w - s) // 2
            images = images[:, :, y:y + s, x:x + s]
        if draw.flip is not None:  # flip the chosen images only (torch.where over a flipped copy of all cost 3x more)
            flipped = host_to(draw.flip.nonzero().squeeze(1), images.device)
            images = images.index_copy(0, flipped, images[flipped].flip(-1))
        return images.contiguous()

    def augment(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], generator))


def host_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto ``device`` without waiting for the device: a plain copy from pageable
    memory to a GPU first waits for everything queued there, which leaves the GPU idle while the host
    then queues the next work. Pinned, the copy is queued like a kernel."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Draw(NamedTuple):
    """One batch's random augmentation: crop corners (None: center crop) and which images flip (None: none)."""
    top: Optional[torch.Tensor]
    left: Optional[torch.Tensor]
    flip: Optional[torch.Tensor]

    def keep(self, rows: torch.Tensor) -> "Draw":
        """The draws of the kept images only (``rows``: a bool mask over the batch)."""
        return Draw(*(None if t is None else t[rows] for t in self))


def normalize(images: torch.Tensor, stats: Stats = "half") -> torch.Tensor:
    """uint8 NCHW batch -> float32, scaled to [0, 1] and standardised with ``stats``."""
    scale, shift = _scale_shift(stats, images.device)
    return images.float().mul_(scale).sub_(shift)  # (x / 255 - mean) / std, in place


@functools.lru_cache(maxsize=None)
def _scale_shift(stats: Stats, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / (255 std) and mean / std per channel, made on ``device`` once: a copy there per batch would
    wait for the GPU each time."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1).to(device) for v in MEAN_STD[stats])
    return 1.0 / (255.0 * std), mean / std
