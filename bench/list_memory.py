"""Peak memory of a target list of a million addresses: read, checked, built into the target space, walked.

Writes a list file of N distinct addresses (default 1,000,000: loopback 127.64.0.0/10 for IPv4,
the documentation prefix 2001:db8::/32 for IPv6; nothing is ever connected to), then does what a
sweep does before its first connect, in this process: `load_targets` (read, scope guard, sort,
deduplicate into the compact array), `TargetSpace` (the permutation), and a walk of every
position (`iter_shard_text`, the sweep's own iterator). Prints the time of each step and the
peak RSS of the process, beside the RSS of the interpreter with relayaudit imported.

    .venv/bin/python bench/list_memory.py [--count N] [--family 4|6|mixed]

The README's memory bound is 200 MB for a whole sweep (10,000 connections in flight, a /8 in
scope); docs/benchmark.md has the figures.
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
import time
from pathlib import Path

from relayaudit.config import parse_config
from relayaudit.sources import load_targets


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _write_list(path: Path, count: int, family: str, seed: int) -> None:
    rng = random.Random(seed)
    v4_base, v6_base = 0x7F400000, 0x20010DB8 << 96  # 127.64.0.0/10, 2001:db8::/32
    with path.open("w", encoding="ascii") as out:
        out.write("# bench/list_memory.py: an IPAM export of loopback and documentation addresses\n")
        for i in range(count):
            use_v6 = family == "6" or (family == "mixed" and i % 2)
            if use_v6:
                value = v6_base + rng.getrandbits(96)
                text = ":".join(f"{(value >> s) & 0xFFFF:x}" for s in range(112, -16, -16))
            else:
                # i times an odd number, modulo 2**22: distinct, scattered, and no list of them
                value = v4_base + (i * 2654435761) % (1 << 22)
                text = ".".join(str((value >> s) & 0xFF) for s in (24, 16, 8, 0))
            out.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--family", choices=["4", "6", "mixed"], default="4")
    args = parser.parse_args()
    base = _rss_mb()
    with tempfile.TemporaryDirectory(prefix="relayaudit-list-") as tmp:
        path = Path(tmp) / "ipam.txt"
        started = time.perf_counter()
        _write_list(path, args.count, args.family, seed=26)
        wrote = time.perf_counter() - started
        print(f"list file: {args.count:,} lines, {path.stat().st_size / 1e6:.1f} MB, "
              f"written in {wrote:.1f} s (RSS so far {_rss_mb():.0f} MB)")
        config = parse_config(
            {
                "scope": ["127.0.0.0/8", "2001:db8::/32"],
                "targets": [],
                "targets_from": [{"file": str(path)}],
                "ports": [25],
            },
            source=str(Path(tmp) / "relayaudit.toml"),
        )
        before = _rss_mb()
        started = time.perf_counter()
        targets = load_targets(config)
        loaded = time.perf_counter() - started
        (source,) = targets.sources
        started = time.perf_counter()
        space = targets.space(config)
        planned = time.perf_counter() - started
        started = time.perf_counter()
        walked = sum(1 for _ in space.iter_shard_text())
        walk = time.perf_counter() - started
    assert walked == len(space) == args.count, (walked, len(space))
    print(f"read and checked: {source.count:,} addresses ({source.bad} bad, "
          f"{source.out_of_scope} out of scope) in {loaded:.1f} s")
    print(f"target space built in {planned:.2f} s, walked ({walked:,} positions) in {walk:.1f} s")
    print(f"RSS: {base:.0f} MB after imports, {before:.0f} MB before reading; "
          f"peak {_rss_mb():.0f} MB (bound: < 200 MB for a whole sweep)")


if __name__ == "__main__":
    main()
