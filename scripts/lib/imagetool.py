#!/usr/bin/env python3
"""Small helpers for scripts/demo and scripts/bench (standard library only).

  imagetool.py mixed OUT SIZE_BYTES SEED
      A disk image of mixed content, reproducible from SEED: 1 MiB extents that are
      random (incompressible), zero, text (log-like lines) or a repeated pattern, and
      inside data extents a few zero 4 KiB blocks as real file systems have.

  imagetool.py random OUT SIZE_BYTES SEED [--append]
      SIZE_BYTES of seeded random bytes.

  imagetool.py mutate FILE PERCENT SEED
      Overwrites PERCENT % of the 4 KiB blocks of FILE (distinct blocks at scattered
      offsets) with new random content, in place, then fsyncs. Prints
      "<blocks> <bytes>" of what changed.

  imagetool.py json FILE KEY...
      Prints the values of top-level KEYs of the JSON object in FILE, one per line
      (true/false/null as JSON spells them).

  imagetool.py measure OUT -- CMD...
      Runs CMD, writes {"wall_s", "user_s", "sys_s", "rc"} as JSON to OUT and exits
      with CMD's exit status.

  imagetool.py freeport
      Prints a TCP port on 127.0.0.1 that was free a moment ago.
"""

import json
import os
import random
import resource
import socket
import subprocess
import sys
import time

BLOCK = 4096
MIB = 1 << 20

WORDS = (
    "replica sync gateway block snapshot checkpoint disk volume agent durable ack "
    "frame sequence offset kernel systemd nginx postgres INFO WARN ERROR request "
    "latency bytes user session cache miss hit write read flush commit"
).split()


def text_extent(rng: random.Random, size: int) -> bytes:
    out = []
    total = 0
    while total < size:
        line = "%010d %s %s: %s\n" % (
            rng.randrange(10**10),
            rng.choice(WORDS).upper(),
            rng.choice(WORDS),
            " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 14))),
        )
        out.append(line)
        total += len(line)
    return "".join(out).encode()[:size]


def cmd_mixed(out: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(out, "wb") as f:
        written = 0
        while written < size:
            n = min(MIB, size - written)
            kind = rng.choices(["random", "zero", "text", "pattern"], [40, 30, 20, 10])[0]
            if kind == "zero":
                chunk = bytes(n)
            elif kind == "random":
                chunk = bytearray(rng.randbytes(n))
                # a few all-zero blocks inside data, as in real file systems
                for _ in range(rng.randrange(0, 4)):
                    b = rng.randrange(n // BLOCK) * BLOCK
                    chunk[b : b + BLOCK] = bytes(BLOCK)
                chunk = bytes(chunk)
            elif kind == "text":
                chunk = text_extent(rng, n)
            else:
                unit = rng.randbytes(rng.choice([16, 512, 4096]))
                chunk = (unit * (n // len(unit) + 1))[:n]
            f.write(chunk)
            written += n
        f.flush()
        os.fsync(f.fileno())


def cmd_random(out: str, size: int, seed: int, append: bool) -> None:
    rng = random.Random(seed)
    with open(out, "ab" if append else "wb") as f:
        left = size
        while left > 0:
            n = min(8 * MIB, left)
            f.write(rng.randbytes(n))
            left -= n


def cmd_mutate(path: str, percent: float, seed: int) -> None:
    rng = random.Random(seed)
    size = os.path.getsize(path)
    blocks = size // BLOCK
    count = max(1, round(blocks * percent / 100.0))
    chosen = sorted(rng.sample(range(blocks), count))
    changed = 0
    with open(path, "r+b") as f:
        for b in chosen:
            f.seek(b * BLOCK)
            old = f.read(BLOCK)
            new = rng.randbytes(BLOCK)
            while new == old:  # never "changes" a block to what it was
                new = rng.randbytes(BLOCK)
            f.seek(b * BLOCK)
            f.write(new)
            changed += 1
        f.flush()
        os.fsync(f.fileno())
    print(changed, changed * BLOCK)


def cmd_json(path: str, keys: list) -> None:
    with open(path) as f:
        text = f.read().strip()
    # tolerate anything before the object (a stray log line) but require one object
    start = text.find("{")
    if start < 0:
        sys.exit("no JSON object in %s" % path)
    obj = json.loads(text[start:])
    for k in keys:
        if k not in obj:
            sys.exit("key %r missing from %s" % (k, path))
        v = obj[k]
        print(v if isinstance(v, str) else json.dumps(v))


def cmd_measure(out: str, argv: list) -> None:
    t0 = time.monotonic()
    try:
        rc = subprocess.call(argv)
    except OSError as e:
        print("cannot run %s: %s" % (argv[0], e), file=sys.stderr)
        rc = 127
    wall = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        json.dump({"wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "rc": rc}, f)
    sys.exit(rc if rc >= 0 else 128 - rc)


def cmd_freeport() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def main() -> None:
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    cmd = a[0]
    if cmd == "mixed" and len(a) == 4:
        cmd_mixed(a[1], int(a[2]), int(a[3]))
    elif cmd == "random" and len(a) in (4, 5):
        cmd_random(a[1], int(a[2]), int(a[3]), a[4:] == ["--append"])
    elif cmd == "mutate" and len(a) == 4:
        cmd_mutate(a[1], float(a[2]), int(a[3]))
    elif cmd == "json" and len(a) >= 3:
        cmd_json(a[1], a[2:])
    elif cmd == "measure" and len(a) >= 4 and a[2] == "--":
        cmd_measure(a[1], a[3:])
    elif cmd == "freeport" and len(a) == 1:
        cmd_freeport()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
