"""The shard manifest written by ``tools/make_shards.py``: classes, splits and their shards (paths kept
inside the manifest's folder), and the shards' sha256. Its two error types: a manifest that cannot
serve the run (ManifestError) and data that cannot be read where every sample counts (DataError)."""
import json
import os
from dataclasses import dataclass
from typing import Optional

from .shards import MANIFEST_FORMAT, sha256_file


@dataclass
class Split:
    name: str
    shards: list[str]  # absolute paths
    num_samples: int


class ManifestError(ValueError):
    """A shard manifest that is missing, unreadable, or asks for something it does not hold."""


class DataError(ValueError):
    """A shard that cannot be read where every sample counts (evaluation), or a label out of range.

    Raised in a loader worker, it reaches the trainer rebuilt by torch from the worker's traceback
    text (``DataError("Caught DataError in DataLoader worker ...")``): its message is then that text's
    last line, so ``str(e)`` is the same one line wherever it was raised."""

    def __init__(self, message: str):
        if message.startswith("Caught DataError"):
            message = message.strip().splitlines()[-1].removeprefix(f"{__name__}.DataError: ")
        super().__init__(message)


class Manifest:
    def __init__(self, path: str):
        self.path = path if path.endswith(".json") else os.path.join(path, "manifest.json")
        self.root = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isfile(self.path):
            raise ManifestError(f"shard manifest not found: {self.path} (make it with tools/make_shards.py)")
        try:
            with open(self.path) as f:
                self.data = json.load(f)
        except (OSError, ValueError) as e:
            raise ManifestError(f"{self.path}: not a readable manifest ({e})") from None
        if not isinstance(self.data, dict) or self.data.get("format") != MANIFEST_FORMAT:
            found = self.data.get("format") if isinstance(self.data, dict) else None
            raise ManifestError(f"{self.path}: format {found!r}, expected {MANIFEST_FORMAT!r}")
        self.num_classes = int(self.data["num_classes"])
        self.class_names = list(self.data["class_names"])

    def split(self, name: str) -> Split:
        splits = self.data["splits"]
        if name not in splits:
            raise ManifestError(f"{self.path}: no split {name!r}; splits are {sorted(splits)}")
        s = splits[name]
        return Split(name, [self._inside(x["path"]) for x in s["shards"]], int(s["num_samples"]))

    def verify(self, splits: list[str], max_bytes: Optional[int] = None) -> int:
        """Check the sha256 of every shard of ``splits`` against the manifest; returns the bytes read,
        0 if they add up to more than ``max_bytes``. A mismatch is a ManifestError naming the shard."""
        shards = {x["path"]: x for name in splits for x in self.data["splits"][name]["shards"]}
        paths = {rel: self._inside(rel) for rel in shards}
        total = sum(os.path.getsize(p) for p in paths.values() if os.path.exists(p))
        if max_bytes is not None and total > max_bytes:
            return 0
        for rel, path in paths.items():
            expected = shards[rel].get("sha256")
            if not os.path.isfile(path):
                raise ManifestError(f"{path}: shard missing")
            digest = sha256_file(path)
            if expected and digest != expected:
                raise ManifestError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                                    f"{expected[:12]}...: the shard is damaged; copy or make it again")
        return total

    def _inside(self, rel: str) -> str:
        """A shard path of the manifest, which must stay inside the manifest's folder."""
        path = os.path.normpath(os.path.join(self.root, rel))
        if os.path.isabs(rel) or os.path.commonpath([path, self.root]) != self.root:
            raise ManifestError(f"{self.path}: shard path {rel!r} leaves the manifest's folder")
        return path
