"""How long this machine takes to wake a process blocked on a pipe: on the CPU it sleeps on, and
on another one.

A gRPC call crosses several threads between the client's call and the server's handler and back
(gRPC's polling and worker threads, its completion queue, the handler pool), and the client and
the server are processes of their own. Each hand-off to a thread that sleeps on another CPU
costs one wake-up of that CPU: tens of microseconds where an idle virtual CPU halts and must be
woken through the hypervisor, several times a wake-up on the same CPU (the baseline, measured in
the same run). Those hand-offs are part of what ``bench/server_overhead.py`` measures, whatever
the server's own code does; this prints their cost on the machine at hand, so that figure can be
read against it.

Each round trip: the parent writes a byte and blocks; the child, pinned to a CPU, works
(busy-waits) for a while, as a server computes a request, then answers. Reported: the round trip
minus that work, i.e. two wake-ups and two pipe transfers.

Usage: python bench/wakeup.py [--rounds 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

WARMUP = 20


def _child(cpu: int, requests: int, answers: int, work_s: float) -> None:
    os.sched_setaffinity(0, {cpu})
    while os.read(requests, 1):
        end = time.perf_counter() + work_s
        while time.perf_counter() < end:
            pass
        os.write(answers, b"x")


def round_trip_us(parent_cpu: int, child_cpu: int, work_s: float, rounds: int) -> float:
    """Median round trip from ``parent_cpu`` to a child on ``child_cpu``, minus the child's
    ``work_s``, in microseconds."""
    requests_r, requests_w = os.pipe()
    answers_r, answers_w = os.pipe()
    pid = os.fork()  # this script imports nothing that starts threads, so forking is safe
    if pid == 0:  # the child never returns into the caller's code
        status = 1
        try:
            os.close(requests_w)
            os.close(answers_r)
            _child(child_cpu, requests_r, answers_w, work_s)
            status = 0
        finally:
            os._exit(status)
    os.close(requests_r)
    os.close(answers_w)
    original = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {parent_cpu})
    extra = []
    try:
        for _ in range(WARMUP + rounds):
            start = time.perf_counter()
            os.write(requests_w, b"x")
            os.read(answers_r, 1)
            extra.append(time.perf_counter() - start - work_s)
    finally:
        os.sched_setaffinity(0, original)
        os.close(requests_w)  # the child reads end-of-file and exits
        os.close(answers_r)
        os.waitpid(pid, 0)
    return statistics.median(extra[WARMUP:]) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    if not hasattr(os, "sched_setaffinity"):
        print("waking another CPU: skipped, this system cannot pin a process to a CPU")
        return 0
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("waking another CPU: skipped, this process may run on one CPU only")
        return 0
    here, there = cpus[0], cpus[1]
    print(f"Waking a process blocked on a pipe (median of {args.rounds} round trips):")
    for work_s in (0.0, 0.001):
        same = round_trip_us(here, here, work_s, args.rounds)
        other = round_trip_us(here, there, work_s, args.rounds)
        print(
            f"  after {work_s * 1e3:g} ms of work: same CPU {same:6.1f} us, another CPU "
            f"{other:6.1f} us (x{other / same:.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
