#!/usr/bin/env python3
"""Reads a baton stats region with nothing but the Python standard library.

It follows shm-stats/LAYOUT.md and nothing else: a proof that the layout document is enough to
write a reader in another language, and a starting point for your own tools.

    python3 read_stats.py /dev/shm/baton.<instance>          # name{tags}: value, one per line
    python3 read_stats.py --json /dev/shm/baton.<instance>   # the same as a JSON object

Counters and gauges print their value; histograms print count, sum and max. Exits 1 with a
message naming the problem if the file is not a region this reader understands.
"""

import json
import mmap
import os
import struct
import sys
import time

MAGIC = b"BATONSHM"
LAYOUT_VERSION = 2
HEADER_SIZE = 128
LOCK_COUNT = 4
LOCK_SIZE = 64
ENTRY_SIZE = 256
SLOT_SIZE = 64
CELL_SIZE = 8
MAX_BOUNDS = 32
KINDS = {1: "counter", 2: "gauge", 3: "histogram"}
SLOT_LIVE, SLOT_RETIRED = 1, 2
MERGE_MAX = 1
U64 = 1 << 64


class RegionError(Exception):
    pass


def round_up(value, to):
    return (value + to - 1) // to * to


def check_header(buf, size):
    """The checks of LAYOUT.md, "Finding and checking a region", in its order."""
    if size < HEADER_SIZE or buf[0:8] != MAGIC:
        raise RegionError("not a baton stats region (no BATONSHM magic)")
    (version, header_size, region_size, max_stats, max_shards, cells_per_shard, lock_count) = (
        struct.unpack_from("=IIQIIII", buf, 8)
    )
    if version != LAYOUT_VERSION:
        raise RegionError(f"layout version {version}; this reader knows {LAYOUT_VERSION}")
    if header_size != HEADER_SIZE or lock_count != LOCK_COUNT or cells_per_shard % 8:
        raise RegionError("header sizes do not match layout version 2")
    locks, names, slots, cells = struct.unpack_from("=QQQQ", buf, 40)
    (bound_count,) = struct.unpack_from("=I", buf, 84)
    (bounds,) = struct.unpack_from("=Q", buf, 112)
    want_locks = HEADER_SIZE
    want_bounds = want_locks + LOCK_COUNT * LOCK_SIZE
    want_names = want_bounds + MAX_BOUNDS * 8
    want_slots = want_names + max_stats * ENTRY_SIZE
    want_cells = round_up(want_slots + (max_shards + 1) * SLOT_SIZE, 64)
    want_size = round_up(want_cells + (max_shards + 1) * cells_per_shard * CELL_SIZE, 4096)
    if (locks, bounds, names, slots, cells) != (
        want_locks,
        want_bounds,
        want_names,
        want_slots,
        want_cells,
    ):
        raise RegionError("the offsets in the header are not the ones the capacities give")
    if region_size != size or want_size != size:
        raise RegionError(f"region_size {region_size} is not the file's size {size}")
    if not 1 <= bound_count <= MAX_BOUNDS:
        raise RegionError(f"{bound_count} histogram bucket bounds (1 to {MAX_BOUNDS})")
    bucket_bounds = struct.unpack_from(f"={bound_count}Q", buf, bounds)
    if bucket_bounds[0] == 0 or any(a >= b for a, b in zip(bucket_bounds, bucket_bounds[1:])):
        raise RegionError("histogram bucket bounds are not above zero and increasing")
    return {
        "buckets": bound_count + 1,
        "max_stats": max_stats,
        "max_shards": max_shards,
        "cells_per_shard": cells_per_shard,
        "names": names,
        "slots": slots,
        "cells": cells,
    }


def read_once(buf, layout):
    stat_count, cells_used = struct.unpack_from("=II", buf, 72)
    if stat_count > layout["max_stats"] or cells_used > layout["cells_per_shard"]:
        raise RegionError("stat_count or cells_used is past the region's capacities")
    entries = []
    for i in range(stat_count):
        at = layout["names"] + i * ENTRY_SIZE
        kind, unit, name_len, tags_len, help_len, merge = struct.unpack_from("=BBBBBB", buf, at)
        first_cell, cell_count = struct.unpack_from("=II", buf, at + 8)
        if kind not in KINDS:
            raise RegionError(f"entry {i} has an unknown kind {kind}")
        if cell_count != (layout["buckets"] + 2 if KINDS[kind] == "histogram" else 1):
            raise RegionError(f"entry {i} has {cell_count} cells, which its kind does not")
        if name_len > 64 or tags_len > 80 or help_len > 96:
            raise RegionError(f"entry {i} has a name, tags or help longer than they may be")
        if first_cell + cell_count > cells_used:
            raise RegionError(f"entry {i} points past the cells in use")
        try:
            name = bytes(buf[at + 16 : at + 16 + name_len]).decode()
            tags = bytes(buf[at + 80 : at + 80 + tags_len]).decode()
        except UnicodeDecodeError:
            raise RegionError(f"entry {i} has a name or tags that are not UTF-8") from None
        entries.append((KINDS[kind], merge, first_cell, name, tags))

    rows = []
    for r in range(layout["max_shards"] + 1):
        (state,) = struct.unpack_from("=I", buf, layout["slots"] + r * SLOT_SIZE)
        if state in (SLOT_LIVE, SLOT_RETIRED):
            base = layout["cells"] + r * layout["cells_per_shard"] * CELL_SIZE
            rows.append(memoryview(buf)[base : base + cells_used * CELL_SIZE].cast("Q"))

    values = {}
    for kind, merge, first, name, tags in entries:
        key = f"{name}{{{tags}}}" if tags else name
        if kind == "counter":
            values[key] = sum(row[first] for row in rows) % U64
        elif kind == "gauge" and merge == MERGE_MAX:
            values[key] = max((row[first] for row in rows), default=0)
        elif kind == "gauge":
            total = sum(row[first] for row in rows) % U64
            values[key] = total - U64 if total >= 1 << 63 else total
        else:
            buckets = layout["buckets"]
            count = sum(sum(row[first : first + buckets]) for row in rows)
            total = sum(row[first + buckets] for row in rows) % U64
            largest = max((row[first + buckets + 1] for row in rows), default=0)
            values[key] = {"count": count, "sum": total, "max": largest}
    for row in rows:
        row.release()
    return values


def read_region(path):
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE:
            raise RegionError("not a baton stats region (too small)")
        buf = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        layout = check_header(buf, size)
        # LAYOUT.md, "Consistent reads": retry while a retirement moves counts.
        for _ in range(1000):
            (before,) = struct.unpack_from("=Q", buf, 88)
            if before % 2:
                time.sleep(0.001)
                continue
            values = read_once(buf, layout)
            (after,) = struct.unpack_from("=Q", buf, 88)
            if after == before:
                return values
        raise RegionError("the region kept changing under the reader (retirements)")
    finally:
        buf.close()


def main(argv):
    args = [a for a in argv if a != "--json"]
    if len(args) != 1:
        print("usage: read_stats.py [--json] REGION_PATH", file=sys.stderr)
        return 2
    try:
        values = read_region(args[0])
    except (OSError, RegionError) as e:
        print(f"read_stats.py: {args[0]}: {e}", file=sys.stderr)
        return 1
    if "--json" in argv:
        print(json.dumps(values, indent=1, sort_keys=True))
    else:
        for key, value in sorted(values.items()):
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
