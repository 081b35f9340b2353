"""Reading shards from where they live: a local path, an ``http(s)://`` URL, or a ``pipe:`` command
(webdataset's URL forms), with a stall timeout, bounded retries with backoff, the manifest's sha256
checked on every remote read, and an optional per-node cache.

webdataset opens URLs itself (``curl`` with its own 30 retries and no stall limit); a multi-day run
needs both bounded, so remote shards are read here, whole, and handed to webdataset's tar reader.
A remote shard is read into memory (one per loader worker: make_shards writes 256 images per shard)
and only handed over once complete and checked, so a retry never repeats or drops a sample.
"""
import fcntl
import hashlib
import io
import os
import selectors
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from ..atomic import write_bytes_atomic

MAX_BACKOFF_S = 60.0


class ShardReadError(OSError):
    """A remote file that could not be read in ``retries + 1`` attempts. ``changed``: it was read
    whole every time but its sha256 was not the manifest's (the shard changed since the manifest was
    written); ``num_samples``: the samples the manifest lists in it (0 if unknown)."""

    def __init__(self, message: str, changed: bool = False, num_samples: int = 0):
        super().__init__(message)
        self.changed, self.num_samples = changed, num_samples


class _Attempt(Exception):
    """One failed attempt; the reason is its message."""


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:"))


def command(url: str, read_timeout_s: float) -> list[str]:
    if url.startswith("pipe:"):
        return ["/bin/sh", "-c", url[len("pipe:"):]]
    # --fail: an HTTP error is an exit status, not an error page read as a shard
    return ["curl", "--fail", "--silent", "--show-error", "--location",
            "--connect-timeout", str(max(1, round(read_timeout_s))), url]


def _read_once(url: str, read_timeout_s: float) -> bytes:
    """Everything the command for ``url`` writes; an attempt fails on a non-zero exit or on
    ``read_timeout_s`` seconds without a byte (the command's process group is then killed)."""
    proc = subprocess.Popen(command(url, read_timeout_s), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    out, err = [], []
    waiting = selectors.DefaultSelector()  # epoll: no FD_SETSIZE limit in a process with many files open
    waiting.register(proc.stdout, selectors.EVENT_READ, out)
    waiting.register(proc.stderr, selectors.EVENT_READ, err)
    try:
        while waiting.get_map():
            ready = waiting.select(read_timeout_s)
            if not ready:
                raise _Attempt(f"no data for {read_timeout_s:g} s (data.read_timeout_s)")
            for key, _ in ready:
                chunk = os.read(key.fd, 1 << 20)
                if chunk:
                    key.data.append(chunk)
                else:
                    waiting.unregister(key.fileobj)
        code = proc.wait(timeout=read_timeout_s)
    except subprocess.TimeoutExpired:
        raise _Attempt(f"the command did not exit {read_timeout_s:g} s after its output ended") from None
    finally:
        waiting.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if code != 0:
        said = b"".join(err).decode(errors="replace").strip().splitlines()
        raise _Attempt(f"{command(url, read_timeout_s)[0]} exited with status {code}"
                       + (f": {said[-1]}" if said else ""))
    return b"".join(out)


@dataclass(frozen=True)
class Fetcher:
    """How remote files are read (picklable: loader workers carry it). ``cache_dir``: shards kept by
    their sha256, fetched once per node."""
    retries: int = 3
    read_timeout_s: float = 60.0
    backoff_s: float = 1.0
    cache_dir: Optional[str] = None

    def read(self, url: str, sha256: Optional[str] = None, num_samples: int = 0) -> bytes:
        """The bytes at ``url`` (its sha256 checked when given), through the cache when there is one."""
        if self.cache_dir and sha256:
            return self._cached(url, sha256, num_samples)
        return self._fetch(url, sha256, num_samples)

    def _fetch(self, url: str, sha256: Optional[str], num_samples: int) -> bytes:
        for attempt in range(self.retries + 1):
            changed = False  # what the last attempt found decides the error's kind
            try:
                data = _read_once(url, self.read_timeout_s)
                digest = hashlib.sha256(data).hexdigest()
                changed = bool(sha256) and digest != sha256
                if changed:
                    raise _Attempt(f"sha256 {digest[:12]}... does not match the manifest's {sha256[:12]}... "
                                   f"(the shard changed since the manifest was written?)")
                return data
            except _Attempt as e:
                reason = str(e)
            if attempt < self.retries:
                wait = min(self.backoff_s * 2 ** attempt, MAX_BACKOFF_S)
                print(f"rlrr: {url}: {reason}; retry {attempt + 1} of {self.retries} in {wait:g} s",
                      file=sys.stderr, flush=True)
                time.sleep(wait)
        raise ShardReadError(f"{url}: {reason} (data.retries = {self.retries} used up)", changed, num_samples)

    def _cached(self, url: str, sha256: str, num_samples: int) -> bytes:
        """A shard from the node's cache, fetched first if it is absent or damaged. The lock makes the
        ranks of a node fetch it once; the rename makes a half-written file impossible to read."""
        os.makedirs(self.cache_dir, exist_ok=True)
        path = os.path.join(self.cache_dir, f"{sha256}.tar")
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    data = f.read()
                if hashlib.sha256(data).hexdigest() == sha256:
                    return data
                print(f"rlrr: {path}: the cached copy of {url} is damaged; fetching it again", file=sys.stderr,
                      flush=True)
            data = self._fetch(url, sha256, num_samples)
            write_bytes_atomic(path, data)
            return data


@dataclass(frozen=True)
class ShardReader:
    """Opens a split's shards: local paths as files, remote ones through the fetcher, checked against
    the manifest's ``{url: (sha256, num_samples)}``."""
    fetcher: Fetcher = Fetcher()
    listed: dict = field(default_factory=dict)

    def open(self, url: str):
        if not is_remote(url):
            return open(url, "rb")
        sha256, num_samples = self.listed.get(url, (None, 0))
        return io.BytesIO(self.fetcher.read(url, sha256, num_samples))

    def streams(self, urls, handler):
        """webdataset's url_opener, reading through this reader: ``{"url", "stream"}`` per shard, a
        failure passed to ``handler`` (True: go on with the next shard). A remote shard is fetched
        while the one before it is read (one ahead, in a thread: curl and the hash release the GIL)."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="rlrr-fetch")
        urls = iter(urls)

        def ahead():
            url = next(urls, None)
            if url is None:
                return None
            return url, (pool.submit(self.open, url) if is_remote(url) else None)
        try:
            following = ahead()
            while following is not None:
                url, fetched = following
                following = ahead()
                try:
                    stream = fetched.result() if fetched is not None else self.open(url)
                except Exception as exn:
                    if handler(exn):
                        continue
                    break
                yield {"url": url, "stream": stream}
        finally:  # a stream closed early (an epoch's last batch): the fetch under way is not waited for
            pool.shutdown(wait=False, cancel_futures=True)
