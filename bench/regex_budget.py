"""What a list of heavy regex rules costs a query, and another client, before and after the regex budget.

The reviewer's list: N patterns `/^([a-z]{1,30}\\.){1,5}evilNNNN[0-9]{1,4}\\.example$/` (329 RE2 instructions
each), written straight into a database (as a database of an older sinkhole holds them; `lists import` now
refuses such a list at the line that goes over the budget). Then:
- policy: milliseconds per decide() of names not asked before, and of the same names asked again;
- server: a real `sinkhole serve` (one worker, loopback); client A sends 100 distinct heavy names at once over
  UDP, client B asks one name right after: how long B waits, and how long A's 100 take.
Run it on two trees (e.g. `git stash` / `git checkout` the commit before) to compare. Measures, asserts nothing.
    .venv/bin/python bench/regex_budget.py [--patterns 3000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dns.query

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sinkhole.model import RuleKind
from sinkhole.policy.decide import Policy
from sinkhole.store.db import Store
from tests.dnsstub import StubResolver


def heavy(i: int) -> str:
    return f"/^([a-z]{{1,30}}\\.){{1,5}}evil{i:04d}[0-9]{{1,4}}\\.example$/"


def names(n: int, tag: str) -> list[str]:
    return [".".join(["abcdefghijklmnopqrstuvwxyzabc"] * 5) + f".{tag}{i}.example.test" for i in range(n)]


def policy_costs(patterns: int) -> None:
    policy = Policy([(heavy(i), "block", "evil") for i in range(patterns)])
    kept = len(policy._regexes)
    asked = names(200, "p")
    t = time.perf_counter()
    for name in asked:
        policy.decide_name(name)
    new = (time.perf_counter() - t) * 1000 / len(asked)
    t = time.perf_counter()
    for name in asked:
        policy.decide_name(name)
    again = (time.perf_counter() - t) * 1000 / len(asked)
    print(f"policy: {patterns} patterns stored, {kept} in force: {new:.3f} ms per new name, {again:.4f} ms per "
          "name asked again")


def server_costs(patterns: int, rounds: int) -> None:
    sinkhole = shutil.which("sinkhole", path=str(Path(sys.executable).parent))
    with tempfile.TemporaryDirectory() as tmp, StubResolver(misbehave=False) as stub:
        db = Path(tmp) / "s.db"
        store = Store(db)
        store.add_rules(RuleKind.BLOCK, [heavy(i) for i in range(patterns)], category="evil")
        store.close()
        proc = subprocess.Popen([sinkhole, "--db", str(db), "serve", "--listen", "127.0.0.1:0", "--upstream",
                                 stub.address, "--workers", "1"], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "SINKHOLE_SHIPPED_LISTS": "false"})
        try:
            port = 0
            deadline = time.monotonic() + 60
            while not port and time.monotonic() < deadline:
                m = re.search(r"listening on udp\+tcp \S+:(\d+)", proc.stderr.readline())
                port = int(m.group(1)) if m else 0
            waits, floods = [], []
            for r in range(rounds):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
                    a.bind(("127.0.0.2", 0))
                    a.settimeout(30)
                    t = time.perf_counter()
                    for name in names(100, f"r{r}x"):
                        a.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", port))
                    b0 = time.perf_counter()
                    dns.query.udp(dns.message.make_query(f"b{r}.example.test", "A"), "127.0.0.1", port=port,
                                  timeout=30)
                    waits.append((time.perf_counter() - b0) * 1000)
                    for _ in range(100):
                        a.recv(4096)
                    floods.append((time.perf_counter() - t) * 1000)
            print(f"server: B waited median {statistics.median(waits):.1f} ms (max {max(waits):.1f}) behind A's 100 "
                  f"new names; A's 100 answered in median {statistics.median(floods):.1f} ms ({rounds} rounds)")
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    policy_costs(args.patterns)
    server_costs(args.patterns, args.rounds)


if __name__ == "__main__":
    main()
