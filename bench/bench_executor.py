"""Benchmark of processes on a Dask cluster (``executors:``) against the same at the station.

Two processes, each run on the same flight at the station and on a ``dask: local`` cluster:

1. **thumbnail** (``max_px: 512``) of ``--photos`` 20 MP JPEGs (5472 x 3648, Pillow noise, about
   10 MB each: CPU-heavy, the case for a cluster);
2. **noop**, a process that does nothing: what the executor itself costs a file (shipping the
   bytes, the round trip through the scheduler, the derived files back); once more with
   ``ship: path`` (the workers read the file where it is: no bytes shipped).

Each case is ``skyframe -q run --once`` (the real command line, so the cluster's start is
counted) to a local folder, with a fresh state directory and sink, alternating the cases in
every round (``--runs`` rounds), after waiting for a quiet machine. Reported: the medians (min,
max) in seconds and photos per second, and the ratios. ``--workers`` sets the cluster's worker
processes (2 by default: this machine's cores). The cluster's start alone is timed too.

Run from the repository root:

    .venv/bin/python bench/bench_executor.py [--photos 24] [--runs 3] [--workers 2]

Everything lives in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine

BIN = Path(sys.executable).parent
NOOP = '''\
from skyframe import process


@process
def process_noop(job):
    """Nothing: what running a process costs, here or on a cluster."""
'''
CONFIG = """\
state_dir: state
plugins: [noop.py]
executors:
  cluster: {{dask: local, workers: {workers}, timeout: 10m}}
  shared: {{dask: local, workers: {workers}, timeout: 10m, ship: path}}
pipelines:
  - name: flight
    source: {{path: photos, settle: 0}}
    processes:
      - {step}
    sinks:
      - url: outbox
"""
STEPS = {
    "thumbnail, station": "thumbnail: {max_px: 512}",
    "thumbnail, cluster": "thumbnail: {max_px: 512, executor: cluster}",
    "noop, station": "noop",
    "noop, cluster": "noop: {executor: cluster}",
    "noop, cluster, path": "noop: {executor: shared}",
}


def make_photos(folder: Path, count: int) -> int:
    from PIL import Image

    folder.mkdir()
    first = folder / "DJI_0001.JPG"
    Image.effect_noise((5472, 3648), 64).convert("RGB").save(first, "JPEG", quality=90)
    for n in range(2, count + 1):
        shutil.copyfile(first, folder / f"DJI_{n:04d}.JPG")
    return first.stat().st_size


def run_case(base: Path, step: str, workers: int, photos: int) -> float:
    shutil.rmtree(base / "state", ignore_errors=True)
    shutil.rmtree(base / "outbox", ignore_errors=True)
    config = base / "skyframe.yaml"
    config.write_text(CONFIG.format(workers=workers, step=step), encoding="utf-8")
    machine.wait_until_quiet()
    began = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "skyframe"), "-q", "run", "--once", str(config)],
        cwd=base,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - began
    delivered = len(list((base / "outbox").glob("*.JPG")))
    if done.returncode != 0 or delivered != photos:
        raise SystemExit(f"bench_executor: {step!r} failed: {done.stderr.strip()[-2000:]}")
    return elapsed


def cluster_start(workers: int) -> float:
    from distributed import Client, LocalCluster

    began = time.perf_counter()
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    client.submit(sum, [1, 2]).result()
    elapsed = time.perf_counter() - began
    client.close()
    cluster.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--photos", type=int, default=24, help="20 MP photos in the flight")
    parser.add_argument("--runs", type=int, default=3, help="rounds, each case once a round")
    parser.add_argument("--workers", type=int, default=2, help="the local cluster's workers")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-executor-"))
    try:
        size = make_photos(base / "photos", args.photos)
        (base / "noop.py").write_text(NOOP, encoding="utf-8")
        print(
            f"{args.photos} photos of 20 MP ({size / 1e6:.1f} MB each), a local cluster of "
            f"{args.workers} worker processes; {args.runs} rounds; Python {sys.version.split()[0]}"
        )
        starts = [cluster_start(args.workers) for _ in range(args.runs)]
        times: dict[str, list[float]] = {case: [] for case in STEPS}
        for round_ in range(args.runs):
            for case, step in STEPS.items():
                times[case].append(run_case(base, step, args.workers, args.photos))
                print(f"  round {round_ + 1}: {case}: {times[case][-1]:.2f} s", flush=True)
        print(
            f"\ncluster start alone: median {statistics.median(starts):.2f} s "
            f"(min {min(starts):.2f}, max {max(starts):.2f})"
        )
        medians = {case: statistics.median(values) for case, values in times.items()}
        print(f"{'case':<22}{'median s':>10}{'min':>8}{'max':>8}{'photos/s':>10}")
        for case, values in times.items():
            print(
                f"{case:<22}{medians[case]:>10.2f}{min(values):>8.2f}{max(values):>8.2f}"
                f"{args.photos / medians[case]:>10.2f}"
            )
        print(
            f"thumbnail: cluster / station = "
            f"{medians['thumbnail, cluster'] / medians['thumbnail, station']:.2f}; "
            f"executor overhead per photo (noop, cluster - station): "
            f"{(medians['noop, cluster'] - medians['noop, station']) / args.photos * 1000:.0f} ms"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
