"""oneref benchmarks: `python scripts/benchmark.py <command> [options]`; the runners live in
oneref.benchmark (`python scripts/benchmark.py --help` lists them)."""

import sys

from oneref.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
