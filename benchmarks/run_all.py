"""Every benchmark of the project, one after another, each in its own process (ratios measured in one run;
nothing about time is asserted). ``--quick`` runs the scaled-down shapes (a few minutes on 2 CPU cores);
without it, the full tables (about half an hour on 2 CPU cores).

    python benchmarks/run_all.py [--quick] [--only scaling memory ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: name → (script, full arguments, quick arguments)
BENCHMARKS = {
    "core": ("bench_core.py", [], ["--repeats", "1"]),
    "scaling": ("bench_scaling.py", [], ["--quick"]),
    "memory": ("bench_memory.py", [], ["--quick"]),
    "partition": ("bench_partition_memory.py", [], ["--samples", "1000", "--batch", "200", "--chunk", "100"]),
    "shards": ("bench_trajectory_shards.py", [], ["--steps", "10", "--width", "128"]),
    "llm": ("bench_llm_checkpoints.py", [], ["--quick"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), default=None)
    args = parser.parse_args(argv)
    failed = []
    for name, (script, full, quick) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        command = [sys.executable, os.path.join(HERE, script), *(quick if args.quick else full)]
        print(f"\n{'=' * 100}\n{name}: {' '.join(['python', 'benchmarks/' + script, *command[2:]])}\n{'=' * 100}",
              flush=True)
        t0 = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            failed.append(name)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
