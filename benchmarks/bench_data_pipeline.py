"""Input-pipeline benchmarks for streamed image data (issue 12, section 3): decoders, memory, start-up time.

A script with subcommands, run by hand (not a test; CI never runs it). Every timing that shares the machine
with other work is CPU time of the process that does the work (``time.process_time``), so other processes'
load does not inflate it; wall times are only taken where the question is about wall time (first batch).

Subcommands:

``make-jpegs --out DIR``
    Test JPEGs cut from real photographs that ship with installed packages (matplotlib's ``grace_hopper.jpg``,
    scikit-learn's ``china.jpg`` and ``flower.jpg``) plus any ``--photo FILE``: random square crops of 35-100 %
    of the shorter side (``--count`` per size), resized with Lanczos to 256² and 512², and 500×375 crops resized
    likewise (ImageNet's most common shape), random flips, saved at quality 90-95 (4:2:0 subsampling, as
    Pillow and most cameras write). Files: ``DIR/256/*.jpg``, ``DIR/512/*.jpg``, ``DIR/500x375/*.jpg``.

``decode --images DIR``
    Decode + augment throughput per worker, in images per CPU-second of one process (one thread), for each
    decoder variant in :data:`DECODERS` and each case in :data:`CASES`. Per image, as a DataLoader worker does
    it: read the file's bytes, decode to an RGB Pillow image (the variant), then the project's
    :class:`~ul_fast.data.augment.ImageTransform` (random crop of the shorter side's square, bicubic resize to
    the training size, flip with p = 1/2, uint8 tensor ``[3, S, S]``) with the per-example generator
    :func:`~ul_fast.data.augment.item_rng`. Variants run interleaved, ``--rounds`` rounds in a shuffled order
    per round, each over every image of the case; the row is the median over rounds (and min-max). The files
    are in the page cache after the first round (a warm-up round is not timed), so disk reads are excluded.
    With ``--step-ms`` and ``--batch`` it also prints the workers one GPU needs at that step rate.

``loader --images DIR``
    The same images through the project's whole streaming path in one process (``LazyImageFolder`` →
    ``StreamingBatches``, ``num_workers=0``) against the per-image pipeline alone, interleaved, in images per
    CPU-second; the uint8 → float conversion of ``next_batch`` (on the device in a GPU run) is shown apart.

``write-pngs --out DIR``
    Fashion-MNIST's training set (the idx files, ``--fmnist``) as PNG files ``DIR/<class>/<i>.png``, padded
    to 32×32 with black as the ``fmnist`` loader does; ``--count`` images (default all 60,000), or
    ``--link-from DIR`` to make a smaller folder of hard links to the first ``--count`` files of a bigger one.

``memory --data SPEC``
    Runs ``ul-fast train`` (``--config``, default ``tiny``) on ``SPEC`` in a child process and samples the
    resident memory of its process tree every ``--interval`` s from ``/proc``: peak RSS of the main process,
    of each worker, and peak of the tree's summed PSS (shared pages split between the processes sharing
    them: the memory the run really holds). Prints one JSON line.

``first-batch --data DIR``
    Wall time from the start of a fresh Python process to its first training batch of a ``folder-stream:``
    folder (``LazyImageFolder`` + ``StreamingBatches``, ``--workers`` workers): cold (the index cache deleted
    first: the folder is listed) and warm (the index read back), ``--repeats`` times each, alternating.

``stage1-flops --config PRESET``
    FLOPs of one stage-1 training step per image of a preset: the encoder's, prior's and decoder's forwards
    counted on the meta device (no memory, no compute), times 3 for forward + backward; with a GPU's FLOP/s
    this gives a step time where no GPU figure exists. Run with ``UL_FAST_BACKEND=reference`` (pure PyTorch).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_data_pipeline.py make-jpegs --out /tmp/jpegs
    OMP_NUM_THREADS=1 python benchmarks/bench_data_pipeline.py decode --images /tmp/jpegs --rounds 7
    OMP_NUM_THREADS=1 python benchmarks/bench_data_pipeline.py loader --images /tmp/jpegs
    python benchmarks/bench_data_pipeline.py write-pngs --out /data/fmnist_png
    python benchmarks/bench_data_pipeline.py memory --data folder-stream:/data/fmnist_png --workers 2
    python benchmarks/bench_data_pipeline.py first-batch --data /data/fmnist_png --repeats 3
    UL_FAST_BACKEND=reference python benchmarks/bench_data_pipeline.py stage1-flops --config imagenet512-paper
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ul_fast.data.augment import ImageTransform, item_rng
from ul_fast.data.folder import decode_image

# ----------------------------------------------------------------------------------------------- test images
IMAGENET_SHAPE = (500, 375)  # (width, height): the most common ImageNet training-image size
QUALITY = (90, 95)


def bundled_photos() -> list[Path]:
    """Real photographs shipped inside installed packages (those that are installed)."""
    photos = []
    with contextlib.suppress(ImportError):  # matplotlib is the plot extra: absent, its photo is skipped
        from matplotlib import cbook
        photos.append(Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    with contextlib.suppress(ImportError):  # scikit-learn is not a dependency: used when installed
        import sklearn.datasets
        photos += sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    return photos


def make_jpegs(out: Path, photos: list[Path], count: int, seed: int) -> None:
    """Write ``count`` JPEGs per shape (256², 512², 500×375) cut from ``photos`` (see the module docstring)."""
    if not photos:
        raise SystemExit("make-jpegs: no photographs found (install matplotlib or pass --photo FILE)")
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in photos]
    shapes = {"256": (256, 256), "512": (512, 512), "500x375": IMAGENET_SHAPE}
    for name, (w, h) in shapes.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        sizes = []
        for i in range(count):
            photo = sources[i % len(sources)]
            pw, ph = photo.size
            # A crop of the photo's aspect ratio w:h, 35-100 % of the largest one that fits.
            fit = min(pw / w, ph / h)
            scale = fit * rng.uniform(0.35, 1.0)
            cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
            left, top = rng.randint(0, pw - cw), rng.randint(0, ph - ch)
            image = photo.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.LANCZOS)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            path = folder / f"{i:05d}.jpg"
            image.save(path, quality=rng.randint(*QUALITY), subsampling="4:2:0")
            sizes.append(path.stat().st_size)
        print(f"{folder}: {count} JPEGs {w}x{h}, mean {statistics.mean(sizes) / 1024:.1f} KiB "
              f"(min {min(sizes) / 1024:.1f}, max {max(sizes) / 1024:.1f})")
    print("from: " + ", ".join(f"{p} {Image.open(p).size[0]}x{Image.open(p).size[1]}" for p in photos))


# ----------------------------------------------------------------------------------------------- decoders
Decoder = Callable[[bytes, int], Image.Image]
"""``decoder(jpeg_bytes, size) -> RGB Pillow image`` whose shorter side is >= ``size`` (the training size)."""


def _pillow(data: bytes, size: int) -> Image.Image:
    return decode_image(data, 3, "bench")  # the project's decoder (ul_fast.data.folder)


def _pillow_draft(data: bytes, size: int) -> Image.Image:
    # JPEG's DCT-domain downscale (1/2, 1/4, 1/8): Pillow picks the largest reduction that keeps both sides
    # >= the requested size, so a 512² file decodes straight to 256² for a 256 training size.
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        side = min(w, h)
        im.draft("RGB", (math.ceil(w * size / side), math.ceil(h * size / side)))
        return im.convert("RGB")


def _simplejpeg(scaled: bool) -> Decoder:
    import simplejpeg

    def decode(data: bytes, size: int) -> Image.Image:
        if not scaled:
            return Image.fromarray(simplejpeg.decode_jpeg(data, "RGB"))
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        side = min(w, h)
        # min_height/min_width: the decoder picks the smallest DCT scaling (n/8) that keeps these.
        array = simplejpeg.decode_jpeg(data, "RGB", min_height=math.ceil(h * size / side),
                                       min_width=math.ceil(w * size / side))
        return Image.fromarray(array)
    return decode


def _turbojpeg(scaled: bool) -> Decoder:
    from turbojpeg import TJPF_RGB, TurboJPEG
    jpeg = TurboJPEG()  # raises when the system's libturbojpeg is missing or too old for this PyTurboJPEG

    def decode(data: bytes, size: int) -> Image.Image:
        factor = None
        if scaled:
            w, h, _, _ = jpeg.decode_header(data)
            k = max((k for k in (1, 2, 4, 8) if min(w, h) // k >= size), default=1)
            factor = (1, k)
        return Image.fromarray(jpeg.decode(data, pixel_format=TJPF_RGB, scaling_factor=factor))
    return decode


def available_decoders() -> tuple[dict[str, Decoder], dict[str, str]]:
    """``(decoders, unavailable)``: the variants that load here, and why the others do not."""
    decoders: dict[str, Decoder] = {"pillow": _pillow, "pillow-draft": _pillow_draft}
    unavailable = {}
    for name, make in (("simplejpeg", _simplejpeg), ("turbojpeg", _turbojpeg)):
        try:
            decoders[name] = make(False)
            decoders[f"{name}-scaled"] = make(True)
        except (ImportError, RuntimeError, OSError) as error:
            unavailable[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return decoders, unavailable


DECODERS = ("pillow", "pillow-draft", "simplejpeg", "simplejpeg-scaled", "turbojpeg", "turbojpeg-scaled")
CASES = {  # name: (folder of test images, training size)
    "256² → 256": ("256", 256),
    "512² → 256": ("512", 256),
    "512² → 512": ("512", 512),
    "500×375 → 512": ("500x375", 512),
}
"""Variants whose name ends in -draft/-scaled differ from the plain decoder only where the source is at least
twice the training size (512² → 256); elsewhere they decode at full size and are timed only there."""


def _scaled_variant(name: str) -> bool:
    return name.endswith(("-draft", "-scaled"))


def _versions() -> dict[str, str]:
    import PIL.features
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
                "pillow": Image.__version__, "pillow libjpeg-turbo": str(PIL.features.version("libjpeg_turbo"))}
    for module, attribute in (("simplejpeg", "__version__"), ("turbojpeg", "__version__")):
        try:
            versions[module] = getattr(__import__(module), attribute)
        except ImportError:
            versions[module] = "not installed"
    return versions


def _time_pass(decoder: Decoder, paths: list[Path], size: int) -> tuple[float, float]:
    """CPU seconds of one pass over ``paths``: ``(read + decode, augment)``."""
    transform = ImageTransform(size, 3, crop="random", flip=True)
    decode_s = augment_s = 0.0
    clock = time.process_time
    for i, path in enumerate(paths):
        t0 = clock()
        image = decoder(path.read_bytes(), size)
        t1 = clock()
        transform(image, item_rng(0, 0, i))
        augment_s += clock() - t1
        decode_s += t1 - t0
    return decode_s, augment_s


def _check_equal(decoders: dict[str, Decoder], paths: list[Path]) -> dict[str, int]:
    """Max absolute difference (uint8 levels) of each full-size decoder's pixels from Pillow's."""
    diffs = {}
    for name, decoder in decoders.items():
        if _scaled_variant(name):
            continue
        diffs[name] = max(int(np.abs(np.asarray(decoder(p.read_bytes(), 1), dtype=np.int16)
                                     - np.asarray(_pillow(p.read_bytes(), 1), dtype=np.int16)).max())
                          for p in paths)
    return diffs


def bench_decode(images: Path, rounds: int, limit: int | None, seed: int, step_ms: float | None, batch: int,
                 out: Path | None) -> None:
    torch.set_num_threads(1)
    decoders, unavailable = available_decoders()
    print(json.dumps({"versions": _versions(), "unavailable": unavailable,
                      "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}))
    rng = random.Random(seed)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for case, (folder, size) in CASES.items():
        paths = sorted((images / folder).glob("*.jpg"))[:limit]
        if not paths:
            raise SystemExit(f"decode: no JPEGs in {images / folder} (run make-jpegs first)")
        names = [n for n in decoders if not _scaled_variant(n) or case == "512² → 256"]
        print(f"{case}: {len(paths)} files, mean {statistics.mean(p.stat().st_size for p in paths) / 1024:.1f} KiB; "
              f"max |pixel - pillow|: {_check_equal({n: decoders[n] for n in names}, paths[:20])}", flush=True)
        for name in names:  # warm-up: page cache, lazy imports, allocator
            _time_pass(decoders[name], paths[:20], size)
        results[case] = {name: [] for name in names}
        for r in range(rounds):
            rng.shuffle(names)
            for name in names:
                results[case][name].append(_time_pass(decoders[name], paths, size))
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        _print_case(case, len(paths), results[case], step_ms, batch)
    if out is not None:
        out.write_text(json.dumps({"versions": _versions(), "unavailable": unavailable, "cases": {
            case: {name: {"decode_cpu_s": [d for d, _ in runs], "augment_cpu_s": [a for _, a in runs]}
                   for name, runs in rows.items()} for case, rows in results.items()}}, indent=1))


def _print_case(case: str, n: int, rows: dict[str, list[tuple[float, float]]], step_ms: float | None,
                batch: int) -> None:
    header = "| decoder | images / CPU-s per worker (min-max) | ms/image: read+decode | augment | vs pillow |"
    if step_ms:
        header += f" workers at {batch} img / {step_ms:g} ms |"
    print(f"\n### {case} ({n} images, median of {len(next(iter(rows.values())))} rounds)\n{header}")
    print("|" + " --- |" * (header.count("|") - 1))
    base = statistics.median(n / (d + a) for d, a in rows["pillow"])
    for name, runs in sorted(rows.items(), key=lambda kv: -statistics.median(n / (d + a) for d, a in kv[1])):
        rates = [n / (d + a) for d, a in runs]
        rate = statistics.median(rates)
        line = (f"| {name} | {rate:.0f} ({min(rates):.0f}-{max(rates):.0f}) | "
                f"{1e3 * statistics.median(d for d, _ in runs) / n:.2f} | "
                f"{1e3 * statistics.median(a for _, a in runs) / n:.2f} | {rate / base:.2f}x |")
        if step_ms:
            line += f" {math.ceil(batch / (step_ms / 1e3) / rate)} |"
        print(line, flush=True)


def bench_loader(images: Path, rounds: int, batch: int) -> None:
    """Images per CPU-second through the project's whole streaming path in one process (``num_workers=0``):
    ``LazyImageFolder`` → ``StreamingBatches`` (random crop, flip) → float batch, against :func:`_time_pass`
    with Pillow on the same files, interleaved. The loader's own cost per image is the difference (index,
    generator, collate) plus the uint8 → float conversion, which a GPU run does on the device after the copy:
    it is timed alone on a batch of the same shape and shown apart."""
    from ul_fast.data.dataset import uint8_to_float
    from ul_fast.data.lazy_folder import LazyImageFolder
    from ul_fast.data.loader import StreamingBatches
    torch.set_num_threads(1)
    print("| case | pipeline alone (images / CPU-s) | StreamingBatches | without its uint8 → float (GPU-side) | "
          "ms/image of that conversion on CPU |\n| --- | --- | --- | --- | --- |")
    for case, (folder, size) in CASES.items():
        source = LazyImageFolder(images / folder, 3)  # flat folder: unlabeled
        paths = [source.path(i) for i in range(len(source))]
        steps = len(source) // batch
        alone, loader, convert = [], [], []
        for _ in range(rounds):
            t0 = time.process_time()
            stream = StreamingBatches(source, ImageTransform(size, 3, "random", True), batch, 0)
            for _ in range(steps):
                stream.next_batch()
            loader.append(time.process_time() - t0)
            pixels = torch.zeros(batch, 3, size, size, dtype=torch.uint8)
            t0 = time.process_time()
            for _ in range(steps):
                uint8_to_float(pixels)
            convert.append(time.process_time() - t0)
            alone.append(sum(_time_pass(_pillow, paths, size)))
        n = steps * batch
        a, b, c = (statistics.median(x) for x in (alone, loader, convert))
        print(f"| {case} | {len(paths) / a:.0f} | {n / b:.0f} | {n / (b - c):.0f} | {1e3 * c / n:.2f} |", flush=True)


# ----------------------------------------------------------------------------------------------- PNG folder
def write_pngs(out: Path, fmnist: Path, count: int | None, link_from: Path | None) -> None:
    from ul_fast.data.fashion_mnist import read_fashion_mnist_idx_uint8
    images, labels = read_fashion_mnist_idx_uint8(fmnist, "train")
    count = len(images) if count is None else count
    t0 = time.perf_counter()
    for i in range(count):
        relative = Path(f"{int(labels[i])}") / f"{i:05d}.png"
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if link_from is not None:
            os.link(link_from / relative, target)
        else:  # padded to 32² with black, as the fmnist loader pads before resizing
            Image.fromarray(np.pad(images[i], 2)).save(target)
    print(f"{out}: {count} PNG files ({'hard links' if link_from else 'written'}) in "
          f"{time.perf_counter() - t0:.1f} s wall")


# ----------------------------------------------------------------------------------------------- memory
def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
        except OSError:  # exited meanwhile
            continue
    return found


def _memory_kib(pid: int) -> tuple[int, int] | None:
    """``(rss, pss)`` of ``pid`` in KiB, or None when it exited."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith(("0", "7")))
        return int(fields["Rss"].split()[0]), int(fields["Pss"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def bench_memory(spec: str, config: str, steps: int, workers: int, interval: float, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "-m", "ul_fast.cli", "train", "--config", config, "--out", f"{run_dir}/run",
                   "--no-progress", "--set", f"data.dataset={spec}", "--set", f"data.num_workers={workers}",
                   "--set", f"train.stage1_steps={steps}", "--set", "train.stage2_steps=0",
                   "--set", f"train.eval_every={10 * steps}", "--set", f"train.checkpoint_every={10 * steps}",
                   "--set", f"train.log_every={steps}"]
        for setting in extra:
            command += ["--set", setting]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0, c0 = time.perf_counter(), os.times()
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak_main = peak_worker = peak_tree_pss = peak_tree_rss = 0
        worker_pids: set[int] = set()
        while child.poll() is None:
            main = _memory_kib(child.pid)
            kids = {k: _memory_kib(k) for k in _children(child.pid)}
            kids = {k: m for k, m in kids.items() if m is not None}
            worker_pids |= set(kids)
            if main is not None:
                peak_main = max(peak_main, main[0])
                peak_tree_pss = max(peak_tree_pss, main[1] + sum(p for _, p in kids.values()))
                peak_tree_rss = max(peak_tree_rss, main[0] + sum(r for r, _ in kids.values()))
            peak_worker = max([peak_worker] + [r for r, _ in kids.values()])
            time.sleep(interval)
        output = child.stdout.read()
        c1 = os.times()
        if child.returncode != 0:
            raise SystemExit(f"memory: ul-fast train failed ({child.returncode}):\n{output[-3000:]}")
        print(json.dumps({"spec": spec, "config": config, "steps": steps, "num_workers": workers,
                          "wall_s": round(time.perf_counter() - t0, 1),
                          "cpu_s_children": round(c1.children_user + c1.children_system
                                                  - c0.children_user - c0.children_system, 1),
                          "peak_rss_main_MiB": round(peak_main / 1024),
                          "peak_rss_worker_MiB": round(peak_worker / 1024),
                          "peak_rss_tree_MiB": round(peak_tree_rss / 1024),
                          "peak_pss_tree_MiB": round(peak_tree_pss / 1024), "worker_processes_seen": len(worker_pids),
                          # ru_maxrss of the waited-for children (KiB): the largest one, the main process
                          "maxrss_children_MiB": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}))


# ----------------------------------------------------------------------------------------------- first batch
_FIRST_BATCH = """
import time, sys
t0 = time.perf_counter()
from ul_fast.data import load_dataset
from ul_fast.data.augment import ImageTransform
from ul_fast.data.loader import StreamingBatches
t_import = time.perf_counter()
source = load_dataset("folder-stream:" + sys.argv[1], "train")
t_index = time.perf_counter()
stream = StreamingBatches(source, ImageTransform(int(sys.argv[3]), 3, "random", True), int(sys.argv[4]), 0,
                          num_workers=int(sys.argv[2]))
images, labels = stream.next_batch()
t_batch = time.perf_counter()
stream.close()
print(len(source), source.index_reused, t_import - t0, t_index - t_import, t_batch - t_index, t_batch - t0)
"""


def bench_first_batch(root: Path, repeats: int, workers: int, size: int, batch: int) -> None:
    index = root / ".ul_fast" / "index.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows: dict[str, list[list[float]]] = {"cold": [], "warm": []}
    for _ in range(repeats):
        for kind in ("cold", "warm"):
            if kind == "cold":
                index.unlink(missing_ok=True)
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, "-c", _FIRST_BATCH, str(root), str(workers), str(size), str(batch)],
                                 env=env, capture_output=True, text=True, check=True).stdout.split()
            n, reused, *seconds = out
            if (reused == "True") != (kind == "warm"):
                raise SystemExit(f"first-batch: {kind} start but index_reused={reused}")
            rows[kind].append([float(s) for s in seconds] + [load])
            print(f"{kind}: {n} images, import {seconds[0][:5]} s, index {seconds[1][:5]} s, "
                  f"first batch {seconds[2][:5]} s, total {seconds[3][:5]} s (load average {load:.1f})", flush=True)
    for kind, runs in rows.items():
        print(f"{kind}: median index {statistics.median(r[1] for r in runs):.2f} s, "
              f"to first batch {statistics.median(r[3] for r in runs):.2f} s over {len(runs)} starts")


# ----------------------------------------------------------------------------------------------- FLOPs
def stage1_flops(config_name: str, batch: int) -> None:
    """FLOPs per image of one stage-1 step: the forwards of the encoder, the prior and the decoder counted on
    the meta device, times 3 for forward + backward (the loss arithmetic around them is negligible and reads
    values, which meta tensors do not have)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ul_fast.config import load_config
    from ul_fast.model import UnifiedLatents
    m = load_config(config_name).model
    with torch.device("meta"):
        model = UnifiedLatents(m)
        x = torch.randn(batch, m.image_channels, m.image_size, m.image_size)
        logsnr = torch.zeros(batch)
        counts = {}
        for name, run in (("encoder", lambda: model.encoder(x)),
                          ("prior", lambda: model.prior(model.encoder(x), logsnr)),
                          ("decoder", lambda: model.decoder(x, logsnr, z_0=model.encoder(x)))):
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            counts[name] = counter.get_total_flops() / batch
    counts["prior"] -= counts["encoder"]
    counts["decoder"] -= counts["encoder"]
    step = 3 * sum(counts.values())
    print(json.dumps({"config": config_name, "image_size": m.image_size,
                      "forward_GFLOP_per_image": {k: round(v / 1e9, 1) for k, v in counts.items()},
                      "stage1_step_GFLOP_per_image": round(step / 1e9, 1)}))


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-jpegs", help="test JPEGs cut from real photographs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=300, help="images per shape")
    p.add_argument("--photo", type=Path, action="append", default=[], help="more photographs to cut from")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("decode", help="decode + augment throughput per worker (CPU time)")
    p.add_argument("--images", type=Path, required=True, help="the folder make-jpegs wrote")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="at most this many images per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-ms", type=float, default=None, help="a GPU step time, for the workers column")
    p.add_argument("--batch", type=int, default=256, help="images per GPU step (with --step-ms)")
    p.add_argument("--json", type=Path, default=None, help="also write every round's times here")
    p = sub.add_parser("loader", help="the whole streaming path in one process vs the pipeline alone")
    p.add_argument("--images", type=Path, required=True, help="the folder make-jpegs wrote")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p = sub.add_parser("write-pngs", help="Fashion-MNIST's training set as a PNG folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fmnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--link-from", type=Path, default=None)
    p = sub.add_parser("memory", help="peak memory of a training run's process tree")
    p.add_argument("--data", required=True, help="a data spec, e.g. folder-stream:DIR")
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--set", dest="extra", action="append", default=[], help="more --set KEY=VALUE for the run")
    p = sub.add_parser("first-batch", help="time to the first batch, cold vs warm index")
    p.add_argument("--data", type=Path, required=True, help="an image folder")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p = sub.add_parser("stage1-flops", help="FLOPs per image of a stage-1 step (meta device)")
    p.add_argument("--config", default="imagenet512-paper")
    p.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)

    if args.command == "make-jpegs":
        if args.out.exists() and any(args.out.iterdir()):
            raise SystemExit(f"make-jpegs: {args.out} is not empty")
        make_jpegs(args.out, bundled_photos() + args.photo, args.count, args.seed)
    elif args.command == "decode":
        bench_decode(args.images, args.rounds, args.limit, args.seed, args.step_ms, args.batch, args.json)
    elif args.command == "loader":
        bench_loader(args.images, args.rounds, args.batch)
    elif args.command == "write-pngs":
        write_pngs(args.out, args.fmnist, args.count, args.link_from)
    elif args.command == "memory":
        bench_memory(args.data, args.config, args.steps, args.workers, args.interval, args.extra)
    elif args.command == "first-batch":
        bench_first_batch(args.data, args.repeats, args.workers, args.size, args.batch)
    else:
        stage1_flops(args.config, args.batch)


if __name__ == "__main__":
    main()
