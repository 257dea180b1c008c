"""Per-step training speed of ddpm_jax against its PyTorch peer: both trainers in one process, in turn.

    python -m bench.step_ratio --config=configs/mnist.py [--peer=peer_exact] [--windows=5]
        [--steps_per_window=8] [--config.FIELD=VALUE ...]

Builds the two trainers of the time-to-quality harness on one config (`bench.time_to_quality`:
`Ours`, the project's compiled step fed by its pipeline under the entry point's XLA:CPU training
flags; and `Peer`, diffusers under `--peer`'s recipe, by default the project's exported
architecture and recipe), compiles and warms each, then times `--windows` windows of
`--steps_per_window` optimiser steps of each side in turn (ours, peer, ours, peer, ...): a drift
in the machine's speed falls on both alike. Prints one JSON line: each side's window times, median
ms per step and images/s, and ours / peer in images/s (the median of the window pairs' ratios).
Per step: no sampling, no evaluation, no compilation in the windows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common

PEERS = ("peer_exact", "peer_diffusers")


def parse_args(argv):
    rest, overrides = common.split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist.py")
    p.add_argument("--peer", default="peer_exact", choices=PEERS)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps_per_window", type=int, default=8)
    p.add_argument("--warmup", type=int, default=8, help="steps of each side after its first (compiling) one")
    p.add_argument("--tag", default="", help="free text stored with the record")
    args = p.parse_args(rest)
    args.overrides = overrides
    common.check_positive(windows=args.windows, steps_per_window=args.steps_per_window, warmup=args.warmup)
    return args


def _window(side, steps: int) -> float:
    start = time.perf_counter()
    side.train(steps)
    return time.perf_counter() - start


def measure(args) -> list[dict]:
    from ddpm_jax import cpu_flags

    cpu_flags.apply("train")  # before JAX starts its backend; XLA flags do not touch the peer
    from bench import time_to_quality

    config = common.load_config(args.config, args.overrides)
    ours = time_to_quality.Ours(config)
    common.check_whole_dispatches(args.steps_per_window, ours.spd)
    peer = time_to_quality.Peer(config, args.peer)
    sides = {"ours": ours, args.peer: peer}
    try:
        for side in sides.values():
            side.train(1)  # ours: the compile
            side.train(args.warmup)
        windows = {name: [] for name in sides}
        for _ in range(args.windows):
            for name, side in sides.items():
                windows[name].append(_window(side, args.steps_per_window))
    finally:
        ours.close()
    record = dict(bench="step_ratio", config=args.config, overrides=args.overrides, tag=args.tag,
                  xla_flags=os.environ.get("XLA_FLAGS", ""), host=common.host_info(), ours=ours.record,
                  peer=dict(side=args.peer, **peer.record), steps_per_window=args.steps_per_window)
    for name, side in sides.items():
        step_s = statistics.median(windows[name]) / args.steps_per_window
        record["ours_timing" if name == "ours" else "peer_timing"] = dict(
            batch=side.batch_size, windows_s=[round(w, 4) for w in windows[name]],
            step_ms=round(1e3 * step_s, 2), images_per_sec=round(side.batch_size / step_s, 2))
    pair_ratios = [(ours.batch_size / a) / (peer.batch_size / b) for a, b in zip(windows["ours"], windows[args.peer])]
    record.update(pair_ratios=[round(r, 4) for r in pair_ratios], ratio=round(statistics.median(pair_ratios), 4))
    return [common.emit(record)]


def main(argv=None) -> list[dict]:
    return common.run_cli(lambda args: measure(parse_args(args)), argv)


if __name__ == "__main__":
    main()
