"""Instructions per call of the request path's pieces, each alone: what a request's instructions (instructions.py)
are made of, for deciding what is worth making cheaper.

    .venv/bin/python -m tests.bench.pieces [--calls 10000] [PIECE ...]

Each piece runs in a fresh interpreter under valgrind's callgrind twice, 1,000 calls and 1,000 + `--calls`
calls; the difference over `--calls` is its cost per call, interpreter start-up and set-up excluded. Inputs
are those of the bench's requests: `GET /x/y` with Host and a bearer token, a cached-credential log line.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_SETUP = """
import sys, time
sys.path.insert(0, {repo!r})
from gateway.accesslog import AccessLog, rfc3339
from gateway.core.hashing import SecretDigester
from gateway.core.request_id import new_request_id
from gateway.core.targets import normalize_target
from gateway.extract import extract, shortcut
from gateway.headers import make_policy, scan_request_headers
from gateway.http.exchange import Exchange, Note
from gateway.request_head import upstream_request_head
from gateway.core.formats import generate_token
TOKEN = generate_token("AbCdEf012345").encode()
HEADERS = [(b"Host", b"127.0.0.1:8080"), (b"Authorization", b"Bearer " + TOKEN)]
POLICY = make_policy(["X-Auth-User", "X-Auth-Groups"])
SCANNED = scan_request_headers(POLICY, HEADERS)
LOG = AccessLog("/dev/null")
DIGESTER = SecretDigester(b"k" * 32)
PUBLIC, SECRET = TOKEN[4:16], TOKEN
"""

PIECES = {
    "access log line": 'LOG.line(b"0123456789abcdef0123456789abcdef", "127.0.0.1", "GET", "api", b"/x/y", 200, 2, '
                       '0.000123, 0.000081, "bearer", "ok", "AbCdEf012345", "svc", "cli:root", "")',
    "rfc3339(time.time())": "rfc3339(time.time())",
    "scan_request_headers": "scan_request_headers(POLICY, HEADERS)",
    "upstream_request_head": 'upstream_request_head(POLICY, SCANNED, method=b"GET", path=b"/x/y", '
                             'client_ip="127.0.0.1", proto=b"http", identity_block=b"X-Auth-User: svc\\r\\n", '
                             'request_id=b"0123456789abcdef0123456789abcdef", host_override=None, websocket=False)',
    "normalize_target": 'normalize_target(b"/x/y")',
    "Exchange()": 'Exchange("127.0.0.1", 50000, b"/x/y")',
    "Note()": 'Note(b"/x/y", b"0123456789abcdef0123456789abcdef")',
    "new_request_id": "new_request_id()",
    "extract (full parse of a bearer token)": "extract(SCANNED.authorization, (), (), True)",
    "shortcut (shape of a bearer token)": "shortcut(SCANNED.authorization, (), ())",
    "SecretDigester.digest_bytes": 'DIGESTER.digest_bytes("token", PUBLIC, SECRET)',
}


def instructions(snippet: str, calls: int) -> int:
    program = _SETUP.format(repo=str(REPO)) + f"for _ in range({calls}):\n    {snippet}\n"
    done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
                           program], capture_output=True, text=True, timeout=600, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no callgrind total for {snippet!r}: {done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10_000, help="calls measured per piece (10000)")
    ap.add_argument("pieces", nargs="*", help=f"some of: {', '.join(PIECES)} (default: all)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    unknown = set(args.pieces) - set(PIECES)
    if unknown:
        ap.error(f"unknown piece(s): {', '.join(sorted(unknown))}")
    base = instructions("pass", 1000), instructions("pass", 1000 + args.calls)
    loop = (base[1] - base[0]) // args.calls
    print(f"\ninstructions per call (callgrind, {args.calls} calls, the loop's own {loop} taken off)\n")
    print("| piece | instructions |\n|---|---|")
    for name in args.pieces or PIECES:
        first, second = instructions(PIECES[name], 1000), instructions(PIECES[name], 1000 + args.calls)
        print(f"| {name} | {(second - first) // args.calls - loop:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
