"""The shard manifest written by ``tools/make_shards.py``: classes, splits and their shards (paths kept
inside the manifest's folder), and the shards' sha256. Its two error types: a manifest that cannot
serve the run (ManifestError) and data that cannot be read where every sample counts (DataError).

The folder may be local, an ``http(s)://`` URL, or a ``pipe:`` command with ``{}`` where a file's path
inside the folder goes (``pipe:aws s3 cp s3://bucket/kitti/{} -``); each shard's location is then
written the same way (webdataset's URL forms)."""
import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote

from ..errors import ManifestError
from .fetch import Fetcher, ShardReader, ShardReadError, is_remote

MANIFEST_FORMAT = "rlrr.shards/1"  # what tools/make_shards.py writes (rlrr.data.shards)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Split:
    name: str
    shards: list[str]  # absolute paths, or URLs / pipe: commands for a remote folder
    num_samples: int


class Manifest:
    def __init__(self, path: str, fetcher: Fetcher = Fetcher()):
        self.fetcher, self.remote = fetcher, is_remote(path)
        if path.startswith("pipe:") and "{}" not in path:
            raise ManifestError(f"{path}: a pipe: command needs {{}} where the file's path goes, "
                                "e.g. 'pipe:aws s3 cp s3://bucket/kitti/{} -'")
        named = path.endswith(".json") and not path.startswith("pipe:")
        if self.remote:
            self.root = path if path.startswith("pipe:") else (path.rsplit("/", 1)[0] if named else path.rstrip("/"))
            self.path = path if named else self._locate("manifest.json")
        else:
            self.path = path if named else os.path.join(path, "manifest.json")
            self.root = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isfile(self.path):
                raise ManifestError(f"shard manifest not found: {self.path} (make it with tools/make_shards.py)")
        try:
            self.data = json.loads(self._read_manifest())
        except (OSError, ValueError) as e:
            raise ManifestError(f"{self.path}: not a readable manifest ({e})") from None
        if not isinstance(self.data, dict) or self.data.get("format") != MANIFEST_FORMAT:
            found = self.data.get("format") if isinstance(self.data, dict) else None
            raise ManifestError(f"{self.path}: format {found!r}, expected {MANIFEST_FORMAT!r}")
        self.num_classes = int(self.data["num_classes"])
        self.class_names = list(self.data["class_names"])

    def _read_manifest(self) -> bytes:
        if not self.remote:
            with open(self.path, "rb") as f:
                return f.read()
        return self.fetcher.read(self.path)

    def split(self, name: str) -> Split:
        splits = self.data["splits"]
        if name not in splits:
            raise ManifestError(f"{self.path}: no split {name!r}; splits are {sorted(splits)}")
        s = splits[name]
        return Split(name, [self._inside(x["path"]) for x in s["shards"]], int(s["num_samples"]))

    def reader(self) -> ShardReader:
        """Opens this manifest's shards, each checked against its sha256 when read from a remote folder."""
        listed = {self._inside(x["path"]): (x.get("sha256"), int(x.get("num_samples", 0)))
                  for s in self.data["splits"].values() for x in s["shards"]}
        return ShardReader(self.fetcher, listed if self.remote else {})

    def verify(self, splits: list[str], max_bytes: Optional[int] = None) -> int:
        """Check the sha256 of every shard of ``splits`` against the manifest; returns the bytes read,
        0 if they add up to more than ``max_bytes``. A mismatch is a ManifestError naming the shard.
        A remote folder is checked on every read anyway: here only when asked (``max_bytes`` None),
        which with a cache fills it."""
        shards = {x["path"]: x for name in splits for x in self.data["splits"][name]["shards"]}
        if self.remote:
            return self._fetch_all(shards.values()) if max_bytes is None else 0
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

    def _fetch_all(self, shards) -> int:
        try:
            return sum(len(self.fetcher.read(self._inside(x["path"]), x.get("sha256"))) for x in shards)
        except ShardReadError as e:
            raise ManifestError(str(e)) from None

    def _inside(self, rel: str) -> str:
        """A shard path of the manifest, which must stay inside the manifest's folder."""
        if self.remote:
            clean = posixpath.normpath(rel)
            if rel.startswith("/") or clean.startswith("..") or not _SAFE_PATH.fullmatch(clean):
                raise ManifestError(f"{self.path}: shard path {rel!r} leaves the manifest's folder or has "
                                    "characters other than letters, digits and ._-/")
            return self._locate(clean)
        path = os.path.normpath(os.path.join(self.root, rel))
        if os.path.isabs(rel) or os.path.commonpath([path, self.root]) != self.root:
            raise ManifestError(f"{self.path}: shard path {rel!r} leaves the manifest's folder")
        return path

    def _locate(self, rel: str) -> str:
        """A file of the remote folder: its URL, or the pipe: command that writes it."""
        return self.root.replace("{}", rel) if self.root.startswith("pipe:") else f"{self.root}/{quote(rel)}"


def open_manifest(data, shards: Optional[str] = None) -> Manifest:
    """The manifest of a run's ``data`` config section (read with its retries, timeout and cache), at
    ``shards`` instead of ``data.shards`` when given."""
    fetcher = Fetcher(data.retries, data.read_timeout_s, data.retry_backoff_s, data.cache_dir)
    return Manifest(shards or data.shards, fetcher)


_SAFE_PATH = re.compile(r"[A-Za-z0-9._/-]+")  # what make_shards writes; nothing a shell or a URL would read
