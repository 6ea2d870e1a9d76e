"""Training-loader throughput: PIL + DataLoader workers vs NVIDIA DALI over the same JPEG shards.

Generates (once, cached under --cache-dir) N JPEGs of 500x375 px whose content is multi-scale
smooth noise, so they compress to about the size of an ImageNet JPEG (~100 KB at quality 90),
writes them into WebDataset shards with `write_shard`, then times one or more training epochs
(RandomResizedCrop at --resolution, flip, normalize) of each backend and prints images/s and
the DALI/PIL ratio. A script, not a test: figures depend on the machine and its load.

    python benchmarks/bench_loaders.py                      # CPU: PIL (2 workers) vs DALI CPU (2 threads)
    python benchmarks/bench_loaders.py --device cuda        # PIL (+ GPU normalize) vs DALI "mixed" decoding
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.loaders import dali_available, make_loader
from pipeline.data.shards import Sample, shard_name, write_shard

WIDTH, HEIGHT = 500, 375
NUM_CLASSES = 10


def noise_image(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """Multi-octave smooth noise: coarse blobs down to fine texture, like a photo's spectrum."""
    acc = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((4, 80.0), (16, 40.0), (64, 20.0), (250, 24.0)):
        rows = max(2, cells * height // width)
        field = rng.normal(0, amp, size=(rows, cells, 3)).astype(np.float32)
        acc += np.stack([np.asarray(Image.fromarray(field[..., c]).resize((width, height), Image.Resampling.BICUBIC))
                         for c in range(3)], axis=-1)
    acc += rng.normal(0, 10, size=acc.shape).astype(np.float32)
    return Image.fromarray(np.clip(acc + 128, 0, 255).astype(np.uint8))


def make_shards(cache_dir: Path, num_images: int, shard_size: int) -> list[Path]:
    """JPEG shards under cache_dir (reused when a previous run finished them)."""
    folder = cache_dir / f"jpeg{WIDTH}x{HEIGHT}-n{num_images}-s{shard_size}"
    done = folder / "done.json"
    names = [shard_name("train", i) for i in range((num_images + shard_size - 1) // shard_size)]
    if not done.is_file():
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        total = 0
        for s, name in enumerate(names):
            samples = []
            for i in range(s * shard_size, min(num_images, (s + 1) * shard_size)):
                buf = io.BytesIO()
                noise_image(rng).save(buf, format="JPEG", quality=90)
                total += buf.tell()
                samples.append(Sample(f"bench_{i:08d}", int(rng.integers(NUM_CLASSES)), buf.getvalue(), "jpg", {}))
            write_shard(folder, name, samples)
        done.write_text(json.dumps({"images": num_images, "mean_jpeg_bytes": total / num_images}))
        print(f"wrote {num_images} JPEGs ({total / num_images / 1e3:.0f} KB mean) in {len(names)} shards "
              f"to {folder} in {time.perf_counter() - t0:.1f} s")
    else:
        info = json.loads(done.read_text())
        print(f"using cached shards {folder} ({info['mean_jpeg_bytes'] / 1e3:.0f} KB mean JPEG)")
    return [folder / f"{n}.tar" for n in names]


def time_backend(backend: str, shards: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """Seconds to the first batch, and images/s after it, over --epochs epochs of one rank."""
    loader = make_loader(shards, train=True, batch_size=args.batch_size, resolution=args.resolution,
                         backend=backend, num_workers=args.workers, num_samples=args.num_images,
                         device=args.device, seed=0)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    first: list[float] = []
    steady_images, steady_time = 0, 0.0
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        t_first = None
        images = 0
        for x, _ in loader:
            images += len(x)
            if t_first is None:
                sync()
                t_first = time.perf_counter()
        sync()
        end = time.perf_counter()
        first.append(t_first - t0)
        steady_images += images - args.batch_size
        steady_time += end - t_first
    return {"first_batch_s": float(np.mean(first)), "images_per_s": steady_images / max(steady_time, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="PIL DataLoader workers = DALI CPU threads")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for DALI 'mixed' decoding (needs a GPU)")
    p.add_argument("--backends", default="pil,dali")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/bench_loaders"))
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU")
    if args.num_images // args.batch_size < 2:
        p.error("--num-images must give at least two batches")
    backends = [b for b in args.backends.split(",") if b]
    if "dali" in backends and not dali_available():
        print("DALI does not import here: timing PIL only (pip install -e .[dali])")
        backends.remove("dali")
    shards = make_shards(args.cache_dir, args.num_images, args.shard_size)
    print(f"training loaders: {args.num_images} images, batch {args.batch_size}, resolution {args.resolution}, "
          f"{args.workers} workers/threads, device {args.device}, {args.epochs} epochs, torch threads "
          f"{torch.get_num_threads()}")
    results = {}
    for backend in backends:
        results[backend] = r = time_backend(backend, shards, args)
        label = {"pil": f"PIL ({args.workers} DataLoader workers)",
                 "dali": f"DALI {'mixed' if args.device.startswith('cuda') else 'CPU'} ({args.workers} threads)"}
        print(f"{label[backend]:34s} {r['images_per_s']:8.1f} images/s   first batch {r['first_batch_s']:.2f} s")
    if "pil" in results and "dali" in results:
        print(f"DALI/PIL throughput ratio: {results['dali']['images_per_s'] / results['pil']['images_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
