"""Time forward + backward of ConSPO's loss from token log-probabilities against the floor.

The floor is the same pass with only the masked token mean (``sequence_scores(...).sum()``): whatever
ConSPO adds on top (group bookkeeping, log-sum-exp, metrics, credits) is the ratio's excess over 1.
Both variants run interleaved in one process, so machine noise hits them alike; the script prints
medians and their ratio. Target (issue 2): ratio <= 1.3 on a 2-core CPU at B=4096, G=8, T=2048.

    python benchmarks/objectives.py [--batch 4096] [--group 8] [--tokens 2048] [--repeats 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from conspo.objectives import conspo_loss, sequence_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="rollouts B")
    parser.add_argument("--group", type=int, default=8, help="rollouts per group G")
    parser.add_argument("--tokens", type=int, default=2048, help="completion tokens T")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats of each variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.batch % args.group:
        parser.error(f"--batch ({args.batch}) must be a multiple of --group ({args.group})")

    gen = torch.Generator().manual_seed(args.seed)
    b, t = args.batch, args.tokens
    base = -torch.rand(b, t, generator=gen) * 3
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    correct = torch.rand(b, generator=gen) < 0.5
    group_ids = torch.arange(b) // args.group

    def floor() -> None:
        logps = base.clone().requires_grad_(True)
        sequence_scores(logps, mask).sum().backward()

    def conspo() -> None:
        logps = base.clone().requires_grad_(True)
        out = conspo_loss(sequence_scores(logps, mask), correct, group_ids, margin=0.05)
        out.loss.backward()

    variants = {"floor (masked mean only)": floor, "sequence_scores + conspo_loss": conspo}
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    print(f"B={b} G={args.group} T={t} repeats={args.repeats} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} cpu={platform.processor() or platform.machine()}")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, med in medians.items():
        print(f"{name:32s} median {med * 1e3:8.1f} ms   (min {min(times[name]) * 1e3:.1f} ms)")
    names = list(variants)
    print(f"ratio conspo / floor (median): {medians[names[1]] / medians[names[0]]:.3f}   target <= 1.3")


if __name__ == "__main__":
    main()
