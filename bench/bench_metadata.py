"""Benchmark of reading drone photos' metadata (``geotag``), and what it costs a delivery.

Three figures:

1. **Extraction rate**: ``skyframe.drone.metadata.read_photo`` over the real photos of
   ``tests/data/drone`` (a senseFly eBee's 12 MP photos with EXIF GPS and senseFly XMP, and a
   Nikon camera's), copied ``--copies`` times into a temporary folder, read in a loop; each
   read opens the file and parses its header only. Reported: photos per second (median of
   ``--runs`` passes, with min and max) and the bytes read per photo compared with its size.
2. **Thumbnails**: ``make_thumbnail`` (the ``thumbnail`` process) of a 20 MP JPEG,
   ``--thumbnails`` per pass: photos per second on one core (median, min and max of
   ``--runs`` passes).
3. **Delivery with and without geotag**: ``skyframe -q run --once`` (the real command line) of
   a flight of ``--flight`` eBee photos with ``processes: [geotag]`` and with no process,
   alternately, ``--runs`` times each, every run with a fresh state directory and sink; to a
   local folder and to S3 (the SeaweedFS server the tests use, on loopback; ``--sinks``
   chooses). Each run waits for a quiet machine first (``machine.py``). Reported per sink:
   the medians, min and max, and the ratio (geotag / without; the target is at most 1.10).
   skyframe's bytecode is written first, as for an installed copy (``baseline.py``).

Run from the repository root:

    .venv/bin/python bench/bench_metadata.py [--copies 100] [--thumbnails 20] [--flight 60]
        [--runs 5] [--sinks local,s3]

Everything lives in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import baseline  # noqa: E402 (beside this file)
import machine  # noqa: E402 (beside this file)
import servers  # noqa: E402 (the servers the tests start, from tests/)

DATA = REPO / "tests" / "data" / "drone"
BIN = Path(sys.executable).parent


def photos() -> list[Path]:
    found = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not found:
        raise SystemExit(f"bench_metadata: no photos under {DATA}")
    return found


def extraction(base: Path, copies: int, runs: int) -> None:
    from skyframe.drone.metadata import read_photo

    folder = base / "photos"
    folder.mkdir()
    files = []
    for i in range(copies):
        for source in photos():
            target = folder / f"{i:04d}-{source.name}"
            shutil.copyfile(source, target)
            files.append(target)
    read_photo(files[0])  # imports and plugin registration, once
    rates = []
    for _ in range(runs):
        began = time.perf_counter()
        for path in files:
            read_photo(path)
        rates.append(len(files) / (time.perf_counter() - began))
    read_bytes = bytes_read_per_photo(files[0])
    size = files[0].stat().st_size
    print(
        f"metadata extraction: {len(files)} photos per pass, {runs} passes: "
        f"median {statistics.median(rates):,.0f} photos/s "
        f"(min {min(rates):,.0f}, max {max(rates):,.0f}); target >= 200 photos/s"
    )
    print(
        f"  bytes read for {files[0].name}: {read_bytes:,} of {size:,} "
        f"({100 * read_bytes / size:.1f}% of the file)"
    )


def bytes_read_per_photo(path: Path) -> int:
    """The bytes ``read_photo`` reads from one file, counted by wrapping ``open``."""
    import builtins

    from skyframe.drone import metadata

    counted = [0]
    real_open = builtins.open

    class Counting:
        def __init__(self, f: object) -> None:
            self._f = f

        def read(self, *args: object) -> bytes:
            data: bytes = self._f.read(*args)  # type: ignore[attr-defined]
            counted[0] += len(data)
            return data

        def readinto(self, buffer: bytearray) -> int:
            n: int = self._f.readinto(buffer)  # type: ignore[attr-defined]
            counted[0] += n
            return n

        def __getattr__(self, name: str) -> object:
            return getattr(self._f, name)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()  # type: ignore[attr-defined]

    def counting_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        return Counting(real_open(file, mode, *args, **kwargs))  # type: ignore[call-overload]

    metadata.open = counting_open  # type: ignore[attr-defined]
    try:
        metadata.read_photo(path)
    finally:
        del metadata.open  # type: ignore[attr-defined]
    return counted[0]


def thumbnails(base: Path, count: int, runs: int) -> None:
    """Previews of a 20 MP photo (5472 x 3648, a DJI Phantom 4's size), made by Pillow from
    noise (so it compresses like a photo, about 10 MB), ``count`` per pass."""
    from PIL import Image

    from skyframe.drone.metadata import make_thumbnail

    photo = base / "twenty-mp.jpg"
    Image.effect_noise((5472, 3648), 64).convert("RGB").save(photo, "JPEG", quality=90)
    target = base / "thumb.jpg"
    rates = []
    for _ in range(runs):
        began = time.perf_counter()
        for _ in range(count):
            with open(photo, "rb") as f:
                make_thumbnail(f, target, max_px=512, quality=80)
        rates.append(count / (time.perf_counter() - began))
    print(
        f"thumbnails of a 20 MP photo ({photo.stat().st_size / 1e6:.1f} MB), max_px 512: median "
        f"{statistics.median(rates):.1f} photos/s (min {min(rates):.1f}, max {max(rates):.1f}), "
        "one core"
    )


CONFIG = """\
state_dir: state
pipelines:
  - name: survey
    source: {{path: flight, settle: 0}}
    processes: [{processes}]
    sinks:
      - {sink}
"""


class LocalSink:
    """A folder beside the source: a copy on the same disk."""

    name = "local folder"

    def __init__(self, base: Path) -> None:
        self.folder = base / "sink"

    def fresh(self) -> str:
        shutil.rmtree(self.folder, ignore_errors=True)
        return "url: sink"

    def count(self) -> int:
        return len(list(self.folder.iterdir()))

    def env(self) -> dict[str, str]:
        return {}


class S3Sink:
    """A new bucket on the SeaweedFS S3 server the tests use, on loopback."""

    name = "S3 (SeaweedFS, loopback)"

    def __init__(self, server: servers.S3Server) -> None:
        self.server = server
        self.bucket = ""

    def fresh(self) -> str:
        self.bucket = f"flight-{uuid.uuid4().hex[:8]}"
        self.server.make_bucket(self.bucket)
        return (
            f"{{url: 's3://{self.bucket}/drop', options: {{endpoint_url: "
            f"'{self.server.endpoint_url}', key: '${{BENCH_S3_KEY}}', "
            "secret: '${BENCH_S3_SECRET}'}}"
        )

    def count(self) -> int:
        fs = self.server.filesystem()
        try:
            return len(fs.ls(f"{self.bucket}/drop", refresh=True))
        finally:
            servers.close_filesystem(fs)

    def env(self) -> dict[str, str]:
        return {"BENCH_S3_KEY": self.server.key, "BENCH_S3_SECRET": self.server.secret}


def delivery(base: Path, flight: int, runs: int, sink: LocalSink | S3Sink) -> None:
    source = base / "flight"
    if not source.is_dir():
        source.mkdir()
        ebee = sorted((DATA / "ebee-snowpeak").glob("*.JPG"))
        for i in range(flight):
            shutil.copyfile(ebee[i % len(ebee)], source / f"IMG_{i:04d}.JPG")
    times: dict[str, list[float]] = {"without": [], "geotag": []}
    for _ in range(runs):
        for case in ("without", "geotag"):
            shutil.rmtree(base / "state", ignore_errors=True)
            config = base / "skyframe.yaml"
            processes = "geotag" if case == "geotag" else ""
            config.write_text(CONFIG.format(processes=processes, sink=sink.fresh()))
            machine.wait_until_quiet()
            began = time.perf_counter()
            done = subprocess.run(
                [str(BIN / "skyframe"), "-q", "run", "--once", str(config)],
                cwd=base,
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, **sink.env()},
            )
            elapsed = time.perf_counter() - began
            if done.returncode != 0 or sink.count() != flight:
                raise SystemExit(f"bench_metadata: the {case} run failed: {done.stderr.strip()}")
            times[case].append(elapsed)
    size = sum(p.stat().st_size for p in source.iterdir())
    medians = {case: statistics.median(values) for case, values in times.items()}
    print(f"delivery of {flight} photos ({size / 1e6:.0f} MB) to {sink.name}:")
    for case, values in times.items():
        print(
            f"  {case:>7}: median {medians[case]:.2f} s "
            f"(min {min(values):.2f}, max {max(values):.2f})"
        )
    print(
        f"  ratio geotag / without: {medians['geotag'] / medians['without']:.3f} (target <= 1.10)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=100, help="copies of each test photo")
    parser.add_argument("--flight", type=int, default=60, help="photos in the delivered flight")
    parser.add_argument("--thumbnails", type=int, default=20, help="previews per pass")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--sinks",
        default="local,s3",
        help="where the flight is delivered: local, s3 or both (comma-separated)",
    )
    args = parser.parse_args()
    sinks = [name.strip() for name in args.sinks.split(",") if name.strip()]
    if not sinks or set(sinks) - {"local", "s3"}:
        parser.error(f"--sinks: expected local and/or s3, got {args.sinks!r}")
    baseline.prepare(None, lambda code: "skyframe")  # its bytecode, as an installed copy has
    base = Path(tempfile.mkdtemp(prefix="skyframe-bench-metadata-"))
    try:
        extraction(base, args.copies, args.runs)
        thumbnails(base, args.thumbnails, args.runs)
        if "local" in sinks:
            delivery(base, args.flight, args.runs, LocalSink(base))
        if "s3" in sinks:
            with servers.S3Server(base / "servers") as server:
                delivery(base, args.flight, args.runs, S3Sink(server))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
