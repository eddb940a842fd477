"""Process memory per cached credential: N gateway.cache.CachedCredential entries in a MemoryCache, shaped
as a worker holds them after a verification (one digest, the stored hash, a prebuilt identity header block).

Run in a fresh interpreter so nothing else is in the measurement: python -m tests.bench.bench_memory N
(rss | tracemalloc); prints one JSON line. run() does both and returns bytes per entry.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fill(count: int) -> Any:
    from datetime import UTC, datetime, timedelta

    from gateway.core.store import AuthRecord
    from gateway.entry import CachedCredential
    from gateway.headers import identity_block, make_policy
    from gateway.memory import MemoryCache

    names = [
        "X-Auth-User-Id",
        "X-Auth-User",
        "X-Auth-Groups",
        "X-Auth-Credential-Id",
        "X-Auth-Credential-Name",
        "X-Auth-Method",
    ]
    policy = make_policy(names)
    cache = MemoryCache(count * 2)
    now = time.monotonic()
    expires = datetime.now(UTC) + timedelta(days=30)
    for i in range(count):
        public_id = hashlib.md5(str(i).encode(), usedforsecurity=False).hexdigest()[:12]
        salt = base64.b64encode(os.urandom(16)).decode().rstrip("=")
        digest = hashlib.sha256(public_id.encode()).digest()
        stored = f"$argon2id$v=19$m=19456,t=2,p=1${salt}${base64.b64encode(os.urandom(32)).decode().rstrip('=')}"
        owner = i % 1000
        # built the way the gateway builds it after a store read
        record = AuthRecord(
            id=i,
            public_id=public_id,
            kind="token",
            secret_hash=stored,
            previous_secret_hash=None,
            previous_expires_at=None,
            name=f"credential-{i}",
            expires_at=expires,
            revoked_at=None,
            owner_id=owner,
            owner_name=f"service-{owner}",
            owner_disabled=False,
            creator="cli:root",
            groups=("readers", "writers"),
            change_seq=0,
        )
        entry = CachedCredential.from_record(record, now)
        entry.add_digest(digest, entry.current_fp)
        entry.keep_block(
            b"bearer",
            identity_block(
                policy,
                {
                    "X-Auth-User-Id": str(owner),
                    "X-Auth-User": entry.owner_name,
                    "X-Auth-Groups": entry.groups,
                    "X-Auth-Credential-Id": public_id,
                    "X-Auth-Credential-Name": entry.name,
                    "X-Auth-Method": "bearer",
                },
            ),
        )
        cache.put(entry)
    return cache


def measure(count: int, how: str) -> dict[str, int]:
    # import first so module code and its objects are not counted
    for module in ("gateway.core.store", "gateway.entry", "gateway.headers", "gateway.memory"):
        importlib.import_module(module)
    gc.collect()
    if how == "tracemalloc":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        cache = fill(count)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    else:
        before = _rss_bytes()
        cache = fill(count)
        gc.collect()
        after = _rss_bytes()
    assert len(cache) == count
    return {"count": count, "bytes": after - before}


# tracemalloc makes allocation ~5x slower: it counts fewer entries (memory per entry is linear in the count)
TRACEMALLOC_MAX = 20_000


def run(count: int) -> dict[str, Any]:
    out: dict[str, Any] = {"count": count}
    for how, n in (("rss", count), ("tracemalloc", min(count, TRACEMALLOC_MAX))):
        done = subprocess.run(
            [sys.executable, "-m", "tests.bench.bench_memory", str(n), how],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"bench_memory {how} failed: {done.stderr.strip().splitlines()[-1:]}")
        out[how] = json.loads(done.stdout)["bytes"]
        out[f"{how}_count"] = n
    return out


def section(f: dict[str, Any]) -> list[str]:
    def per_entry(how: str) -> float:
        return float(f[how]) / float(f[f"{how}_count"])

    return [
        f"{f['count']} gateway.cache.CachedCredential entries in a gateway.cache.MemoryCache, each as a worker "
        "holds it after one verification (one remembered digest, the stored hash, a prebuilt identity header "
        "block; 1000 distinct owners), built with CachedCredential.from_record in a fresh interpreter.",
        "",
        "| measured by | entries | per 100,000 cached credentials | per credential |",
        "|---|---|---|---|",
        *(
            f"| {how} | {f[f'{how}_count']} | {per_entry(how) * 100_000 / 2**20:.1f} MiB | {per_entry(how):.0f} B |"
            for how in ("rss", "tracemalloc")
        ),
    ]


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), sys.argv[2])))
