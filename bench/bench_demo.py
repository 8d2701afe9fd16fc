"""Time the default demo build: python bench/bench_demo.py [N_TRAIN N_TEST]

Builds the demo set (leaml/data/demo/build.py) into a temporary folder and prints seconds and images/s.
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leaml.data.demo.build import DemoConfig, build_demo_files  # noqa: E402


def main() -> None:
    cfg = DemoConfig() if len(sys.argv) < 3 else DemoConfig(n_train=int(sys.argv[1]),
                                                            n_test=int(sys.argv[2]))
    n = cfg.n_train + cfg.n_test
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        manifest = build_demo_files(Path(tmp), cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows = sum(1 for _ in open(manifest, encoding="utf-8"))
        mb = sum(p.stat().st_size for p in Path(tmp).rglob("*")) / 1e6
    print(f"demo build: {n} images, {rows} QA rows, {mb:.1f} MB: {wall:.1f} s wall "
          f"({cpu:.1f} s CPU), {n / wall:.0f} images/s")


if __name__ == "__main__":
    main()
