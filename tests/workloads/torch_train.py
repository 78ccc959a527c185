#!/usr/bin/env python3
"""A real PyTorch training loop on CUDA, for stallmon's end-to-end check (`cargo xtask gpu-e2e`)
and demo on GPU hosts.

A small CNN trains on image-like files: ``--files`` raw uint8 files of 3x64x64 bytes (written once
by ``--prepare``), read by a ``DataLoader`` with ``--workers`` worker processes that decode them to
tensors (uint8 -> float, normalize, random flip). With ``--uncached`` each file's pages are dropped
from the page cache after it is read (``posix_fadvise(POSIX_FADV_DONTNEED)``), so every epoch reads
the disk again; ``--prepare --uncached`` also evicts the dataset after creating it.

Under torchrun (``python -m torch.distributed.run --nproc_per_node N torch_train.py ...``) each rank
reads ``LOCAL_RANK``, ``RANK`` and ``WORLD_SIZE`` from its environment and trains on GPU
``LOCAL_RANK % device_count`` (so several ranks may share one GPU). With ``--ddp`` the ranks form a
process group (NCCL when every local rank has a GPU of its own, else gloo, which allows ranks that
share a GPU), shard the dataset (``DistributedSampler``), wrap the model in
``DistributedDataParallel`` (a gradient all-reduce per step), and agree every step on when to stop,
so that no rank waits for a peer that has left. Without ``--ddp`` ranks train independently.

Needs only PyTorch (preinstalled on GPU hosts); nothing is downloaded. Nothing is printed on stdout
(under ``stallmon trace --json`` the job's stdout is stallmon's): progress goes to stderr.
"""

import argparse
import os
import sys
import time

try:  # only the training needs PyTorch (--prepare and py_compile do not)
    import torch
    from torch.utils.data import Dataset
except ImportError:  # reported by main()
    torch = None
    Dataset = object

C, H, W = 3, 64, 64
ITEM_BYTES = C * H * W
CLASSES = 10


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--files", type=int, default=2000, help="images in the dataset")
    p.add_argument("--prepare", action="store_true", help="create the dataset and exit")
    p.add_argument("--uncached", action="store_true",
                   help="drop each file from the page cache after reading it")
    p.add_argument("--workers", type=int, default=4, help="DataLoader num_workers")
    p.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default="fork")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=64, help="channels of the first conv layer")
    p.add_argument("--seconds", type=float, default=30.0, help="training time")
    p.add_argument("--device", default="cuda",
                   help="cuda (GPU LOCAL_RANK %% device_count), cuda:N, or cpu")
    p.add_argument("--ddp", action="store_true",
                   help="under torchrun: DistributedDataParallel across the ranks (see above)")
    return p.parse_args(argv)


def dist_env():
    """(rank, local_rank, world_size) from torchrun's environment (0, 0, 1 without it)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


def files_of(data, n):
    return [os.path.join(data, "img-%05d.u8" % i) for i in range(n)]


def prepare(data, n):
    os.makedirs(data, exist_ok=True)
    for path in files_of(data, n):
        try:
            if os.stat(path).st_size == ITEM_BYTES:
                continue
        except FileNotFoundError:
            pass
        with open(path + ".tmp", "wb") as f:
            f.write(os.urandom(ITEM_BYTES))
            f.flush()
            os.fsync(f.fileno())
        os.rename(path + ".tmp", path)
    fd = os.open(data, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(paths):
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_file(path, uncached):
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, ITEM_BYTES)
        if uncached:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if len(data) != ITEM_BYTES:
        raise IOError("%s: %d bytes, expected %d" % (path, len(data), ITEM_BYTES))
    return data


class Images(Dataset):
    """Raw 3x64x64 uint8 files, decoded in the DataLoader workers (module level: picklable for
    the spawn and forkserver start methods)."""

    def __init__(self, paths, uncached):
        self.paths = paths
        self.uncached = uncached
        self.mean = torch.tensor([0.5, 0.5, 0.5]).view(C, 1, 1)
        self.std = torch.tensor([0.25, 0.25, 0.25]).view(C, 1, 1)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        raw = read_file(self.paths[i], self.uncached)
        x = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(C, H, W)
        x = x.float().div_(255.0)
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        x = (x - self.mean) / self.std
        return x, i % CLASSES


def main(argv):
    args = parse_args(argv)
    paths = files_of(args.data, args.files)
    if args.prepare:
        prepare(args.data, args.files)
        if args.uncached:
            evict(paths)
        return 0

    if torch is None:
        sys.exit("torch_train.py: PyTorch is not installed (import torch failed)")
    import torch.nn as nn
    from torch.utils.data import DataLoader

    rank, local_rank, world = dist_env()
    tag = "torch_train[rank %d/%d]" % (rank, world) if world > 1 else "torch_train"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("torch_train.py: CUDA is not available (torch.cuda.is_available() is False)")
    if args.device == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device(args.device)
    dist = None
    if args.ddp and world > 1:
        import torch.distributed as dist
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        own_gpu = device.type == "cuda" and torch.cuda.device_count() >= local_world
        backend = "nccl" if own_gpu else "gloo"
        dist.init_process_group(backend=backend)
        print("%s: process group up (%s), device %s" % (tag, backend, device),
              file=sys.stderr, flush=True)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        sys.exit("torch_train.py: dataset incomplete (%d files missing): run with --prepare first"
                 % len(missing))

    w = args.width
    model = nn.Sequential(
        nn.Conv2d(C, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * w, CLASSES),
    ).to(device)
    if dist is not None:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    loader_kw = {}
    if args.workers > 0:
        loader_kw = dict(persistent_workers=True, prefetch_factor=2,
                         multiprocessing_context=args.start_method)
    dataset = Images(paths, args.uncached)
    sampler = None
    if dist is not None:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(dataset, shuffle=True, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=sampler is None,
                        sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, **loader_kw)

    def stop_now(now):
        """Past the deadline? Under DDP every rank must stop at the same step: decided together
        (any rank past its deadline stops them all)."""
        if dist is None:
            return now >= deadline
        flag = torch.tensor([1 if now >= deadline else 0],
                            device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    start = time.monotonic()
    deadline = start + args.seconds
    steps = images = 0
    last_report = start
    loss = None
    epoch = 0
    done = False
    while not done:
        if sampler is not None:
            sampler.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            steps += 1
            images += x.shape[0]
            now = time.monotonic()
            if now - last_report >= 5.0:
                print("%s: %.0f s, %d steps, %.0f images/s, loss %.3f"
                      % (tag, now - start, steps, images / (now - start), loss.item()),
                      file=sys.stderr, flush=True)
                last_report = now
            if stop_now(now):
                done = True
                break
        else:
            done = dist is None and time.monotonic() >= deadline
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.monotonic() - start
    print("%s: done: %d steps, %d images in %.1f s (%.0f images/s)"
          % (tag, steps, images, elapsed, images / max(elapsed, 1e-9)), file=sys.stderr,
          flush=True)
    if dist is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
