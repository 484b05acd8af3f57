"""Checkpoint conversion at scale: HF -> orbax -> HF on a synthetic >= 4 GB Qwen3.5-MoE checkpoint.

    python benchmarks/bench_convert.py [--gb 5] [--workdir /tmp/qwax_bench_convert] [--keep]

Generates the checkpoint (benchmarks/make_synthetic_checkpoint.py), runs `qwax convert hf-to-orbax` (scanned
layout) and `qwax convert orbax-to-hf` each in its own process, checks that every tensor of the result is bitwise
equal to the source (keys, dtypes, shapes, bytes), and prints each step's time, throughput and peak RSS (the
child's ru_maxrss) against the bound peak RSS <= 2 x largest tensor + 1 GB. Throughput is also given relative to
a plain copy of the same shard files measured in the same run (the disk's speed on this machine, now).
Everything it wrote is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def run_child(argv: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a child process; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed with status {status}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def copy_files(src: Path, dst: Path) -> float:
    dst.mkdir(parents=True)
    start = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
    os.sync()
    return time.perf_counter() - start


def bitwise_equal(a: Path, b: Path) -> int:
    """Compares every tensor of two checkpoints in 64 MB pieces; returns the number compared."""
    from qwax.convert.safetensors_io import CheckpointReader

    with CheckpointReader(a) as x, CheckpointReader(b) as y:
        if x.keys() != y.keys():
            raise SystemExit(f"key lists differ: {sorted(set(x.keys()) ^ set(y.keys()))[:5]}")
        for key in x.keys():
            if x.shape(key) != y.shape(key) or x.dtype(key) != y.dtype(key):
                raise SystemExit(f"{key}: {x.dtype(key)} {x.shape(key)} vs {y.dtype(key)} {y.shape(key)}")
            shape = x.shape(key)
            if not shape:
                same = x.get(key).tobytes() == y.get(key).tobytes()
            else:
                step = max(1, (64 << 20) // max(1, x.nbytes(key) // max(shape[0], 1)))
                same = all(np.array_equal(x.get_slice(key, r, min(r + step, shape[0])).view(np.uint8),
                                          y.get_slice(key, r, min(r + step, shape[0])).view(np.uint8))
                           for r in range(0, shape[0], step))
            if not same:
                raise SystemExit(f"{key}: bytes differ")
        return len(x.keys())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=5.0)
    parser.add_argument("--workdir", default="/tmp/qwax_bench_convert")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--vocab", type=int, default=248320, help="smaller for a quick trial run")
    args = parser.parse_args(argv)
    from qwax.convert.safetensors_io import CheckpointReader

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    src, orbax, out, copy = work / "hf", work / "orbax", work / "hf_out", work / "copy"
    try:
        gen_s, _ = run_child([sys.executable, str(HERE / "make_synthetic_checkpoint.py"), str(src), "--gb", str(args.gb),
                               "--vocab", str(args.vocab)])
        with CheckpointReader(src) as reader:
            sizes = {k: reader.nbytes(k) for k in reader.keys()}
        total, largest = sum(sizes.values()), max(sizes.values())
        bound = 2 * largest + (1 << 30)
        copy_s = copy_files(src, copy)
        shutil.rmtree(copy)
        qwax = [sys.executable, "-m", "qwax.cli", "convert"]
        to_orbax_s, to_orbax_rss = run_child(qwax + ["hf-to-orbax", str(src), str(orbax), "--no-progress"])
        to_hf_s, to_hf_rss = run_child(qwax + ["orbax-to-hf", str(orbax), str(out), "--no-progress",
                                               "--max-shard-size", "1GB"])
        compared = bitwise_equal(src, out)
        orbax_bytes = sum(f.stat().st_size for f in orbax.rglob("*") if f.is_file())

        print(f"\nsynthetic Qwen3.5-MoE checkpoint: {len(sizes)} tensors, {total / 1e9:.2f} GB in "
              f"{len(list(src.glob('*.safetensors')))} shards (generated in {gen_s:.0f} s); largest tensor "
              f"{largest / 1e9:.2f} GB; orbax checkpoint {orbax_bytes / 1e9:.2f} GB on disk")
        print(f"peak-RSS bound: 2 x largest + 1 GiB = {bound / 1e9:.2f} GB")
        copy_mbs = total / 1e6 / copy_s
        print(f"{'step':<14}{'seconds':>9}{'MB/s':>8}{'x copy':>8}{'peak RSS GB':>13}{'<= bound':>10}")
        print(f"{'plain copy':<14}{copy_s:>9.1f}{copy_mbs:>8.0f}{1.0:>8.2f}{'':>13}{'':>10}")
        for name, seconds, rss in (("hf-to-orbax", to_orbax_s, to_orbax_rss), ("orbax-to-hf", to_hf_s, to_hf_rss)):
            mbs = total / 1e6 / seconds
            print(f"{name:<14}{seconds:>9.1f}{mbs:>8.0f}{mbs / copy_mbs:>8.2f}{rss / 1e9:>13.2f}{str(rss <= bound):>10}")
        print(f"bitwise equal after HF -> orbax -> HF: all {compared} tensors")
        ok = max(to_orbax_rss, to_hf_rss) <= bound
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
