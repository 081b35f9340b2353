#!/usr/bin/env python
"""Input-pipeline throughput: rlrr's shard loader vs a per-file PIL loader (what the reference does:
open, decode and resize every JPEG in every epoch), on the same images with the same workers; the
shards streamed with the workers decoding and with this process decoding on --device
(data.decode: device: nvJPEG on a GPU); and the same shards streamed from an HTTP server (Python's
http.server in its own process, on this machine: the cost of curl, the sha256 check and the retry
machinery, not of a network), without and with data.cache_dir. Our batches end normalised on --device.

    python tools/bench_data.py --images 1000 --workers 2 --epochs 3
    python tools/bench_data.py --images 4000 --workers 8 --batch-size 64 --device cuda   # on a GPU

The images are real Fashion-MNIST photos (Debian dataset-fashion-mnist) enlarged to --source-size
JPEGs in a VTAB-1k folder (train800val200.txt), i.e. the layout and typical file sizes of VTAB tasks.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from rlrr.atomic import write_text_atomic
from rlrr.data.fetch import Fetcher
from rlrr.data.loader import SplitLoader
from rlrr.data.manifest import Manifest
from rlrr.data.shards import write_shards
from rlrr.data.sources import _read_idx, read_vtab
from rlrr.data.transforms import Recipe, normalize

FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


class PerFileLoader(Dataset):
    """The reference implementation's loader: a list file, PIL open + resize + normalise per access."""

    def __init__(self, root, listing):
        with open(os.path.join(root, listing)) as f:
            self.items = [(os.path.join(root, p), int(c)) for p, c in (line.split() for line in f if line.strip())]
        self.transform = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                                    T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return self.transform(Image.open(path).convert("RGB")), label


def make_vtab_folder(root, n, size):
    images = _read_idx(FASHION)[:n]
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "train800val200.txt"), "w") as f:
        for i, img in enumerate(images):
            rel = f"images/{i:06d}.jpg"
            Image.fromarray(img).convert("RGB").resize(size, Image.BICUBIC).save(os.path.join(root, rel), quality=95)
            f.write(f"{rel} {i % 10}\n")


def throughput(epochs, batches_of_epoch, finish=lambda x: x):
    """Median images/s over epochs (the first, with worker start-up, is included in the median's pool)."""
    rates = []
    for epoch in range(epochs):
        n, t0 = 0, time.perf_counter()
        for batch in batches_of_epoch(epoch):
            last = finish(batch[0])
            n += last.shape[0]
        if last.is_cuda:
            torch.cuda.synchronize(last.device)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def http_server(folder: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the HTTP server did not start")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--source-size", default="500x375", help="WxH of the source JPEGs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where our batches are normalised (and decoded, with "
                    "data.decode: device; an in-memory split lives there)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    size = tuple(int(v) for v in args.source_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "task"), os.path.join(tmp, "shards")
        make_vtab_folder(src, args.images, size)
        baseline = PerFileLoader(src, "train800val200.txt")
        per_file = throughput(args.epochs, lambda e: DataLoader(
            baseline, batch_size=args.batch_size, shuffle=True, num_workers=args.workers))

        t0 = time.perf_counter()
        write_shards(read_vtab(src), out, image_size=224, shard_size=64, workers=args.workers, progress=False)
        shard_time = time.perf_counter() - t0
        manifest, tf = Manifest(out), Recipe("vtab", train=True, flip=True)

        def on_device(images):  # our batches arrive as uint8, normalised where training runs
            return normalize(images.to(device, non_blocking=True))
        stream = SplitLoader(manifest, "train800val200", train=True, batch_size=args.batch_size, recipe=tf,
                             workers=args.workers)
        streaming = throughput(args.epochs, stream.epoch, on_device)
        decoding_here = SplitLoader(manifest, "train800val200", train=True, batch_size=args.batch_size, recipe=tf,
                                    workers=args.workers, decode_device=device)
        device_decode = throughput(args.epochs, decoding_here.epoch, on_device)
        t0 = time.perf_counter()
        memory = SplitLoader(manifest, "train800val200", train=True, batch_size=args.batch_size, recipe=tf,
                             workers=args.workers, in_memory=True, device=device)
        cache_time = time.perf_counter() - t0
        in_memory = throughput(args.epochs, memory.epoch, on_device)
        server, url = http_server(out)
        try:
            remote = {}
            for name, cache in (("http", None), ("http_cached", os.path.join(tmp, "cache"))):
                loader = SplitLoader(Manifest(url, Fetcher(cache_dir=cache)), "train800val200", train=True,
                                     batch_size=args.batch_size, recipe=tf, workers=args.workers)
                remote[name] = throughput(args.epochs, loader.epoch, on_device)
        finally:
            server.kill()
    result = {"images": args.images, "source_size": args.source_size, "workers": args.workers,
              "batch_size": args.batch_size, "epochs": args.epochs, "device": str(device),
              "per_file_pil_img_s": round(per_file, 1), "shards_streaming_img_s": round(streaming, 1),
              "shards_streaming_device_decode_img_s": round(device_decode, 1),
              "shards_in_memory_img_s": round(in_memory, 1), "shards_http_streaming_img_s": round(remote["http"], 1),
              "shards_http_cached_streaming_img_s": round(remote["http_cached"], 1),
              "ratio_streaming": round(streaming / per_file, 2), "ratio_in_memory": round(in_memory / per_file, 2),
              "one_time_make_shards_s": round(shard_time, 1), "one_time_in_memory_decode_s": round(cache_time, 1)}
    print(f"per-file PIL loader (reference)   {per_file:9.1f} img/s")
    print(f"rlrr shards, streaming            {streaming:9.1f} img/s   {streaming / per_file:5.2f}x")
    print(f"rlrr shards, decoded on {str(device):<10}{device_decode:9.1f} img/s   {device_decode / per_file:5.2f}x")
    print(f"rlrr shards, in memory            {in_memory:9.1f} img/s   {in_memory / per_file:5.2f}x")
    for name, label in (("http", "streaming over HTTP"), ("http_cached", "HTTP + data.cache_dir")):
        print(f"rlrr shards, {label:<21}{remote[name]:9.1f} img/s   {remote[name] / per_file:5.2f}x")
    print(f"one-time costs: make_shards {shard_time:.1f} s, in-memory decode {cache_time:.1f} s")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
