"""Autobahn WebSocket conformance run against comet's echo endpoint.

Usage: python3 tests/autobahn/run.py URL EXPECTED.json [--update]

Runs every case except 9.* (performance) with kosoku, compression (12.*,
13.*: permessage-deflate, which the echo endpoint negotiates) included, then compares each case's behaviour with
the committed expectation. Fails when a case ends in anything but OK,
NON-STRICT or INFORMATIONAL, or when a case regressed from the expectation.
"""

import asyncio
import json
import os
import sys

import kosoku

ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}


def name(behavior):
    """`Behavior.NON_STRICT` -> `NON-STRICT`, the report's spelling."""
    return str(behavior).split(".")[-1].replace("_", "-")


async def run(url):
    try:
        return await kosoku.run_fuzzingclient(url, exclude_cases=["9.*"], concurrency=4)
    except kosoku.FailureError as e:
        return e.results


def main():
    url, expected_path = sys.argv[1], sys.argv[2]
    update = "--update" in sys.argv[3:]
    results = asyncio.run(run(url))
    got = {str(r.case_id): {"behavior": name(r.behavior), "behavior_close": name(r.behavior_close)} for r in results}
    bad = {k: v for k, v in got.items() if v["behavior"] not in ACCEPTED or v["behavior_close"] not in ACCEPTED}
    if update:
        with open(expected_path, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(expected_path) as f:
        expected = json.load(f)
    regressions = {k: (expected.get(k), v) for k, v in got.items() if expected.get(k) != v}
    missing = sorted(set(expected) - set(got))
    counts = {}
    for v in got.values():
        counts[v["behavior"]] = counts.get(v["behavior"], 0) + 1
    print(f"autobahn {url}: {len(got)} cases, behaviours {counts}")
    for k, v in sorted(bad.items()):
        print(f"  NOT ACCEPTED {k}: {v}")
    for k, (was, now) in sorted(regressions.items()):
        print(f"  CHANGED {k}: expected {was}, got {now}")
    for k in missing:
        print(f"  MISSING {k}")
    failed = len(bad) + len(regressions) + len(missing)
    print(f"autobahn: {len(got) - failed} passed, {failed} failed")
    sys.stdout.flush()
    # os._exit skips interpreter finalization, where kosoku's native
    # runtime has been seen to abort after a complete, passing run.
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
