"""Decoding speed per budget: stateful (KV cache + Mamba conv/SSM states) vs a full forward over
the whole prefix per token, batch 1 and batch 8, at the tiny recipe's size and at hidden 1024.

For each size: a perturbed elastic parent and three homogeneous budgets (every width axis at
100 / 75 / 50 %, as bench_family), each physically sliced (what `generate` runs).  Every
(budget, batch) decodes `--tokens` new tokens (no early stop) after random prompts of
`--prompt` tokens; batch 8 has prompt lengths prompt-3 .. prompt+4 (no padding, see
nemo_elastic.inference).  Cached runs: one warm-up, median of `--reps`; uncached runs (slow):
one run after the cached warm-up.  Printed side by side as ratios:

* cached / uncached: what the state saves;
* speed vs full (cached): a smaller budget should be faster in proportion to its size; the goal
  is >= 0.8 x (1 / parameter fraction) for the 50 % budget at hidden 1024.

Run: `.venv/bin/python bench/bench_decode.py [--sizes tiny 1024 --tokens 32 --prompt 16
--reps 3 --threads 1]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)


def _config(size: str):
    """The tiny recipe's model (conf/tiny.yaml) or the benchmark hybrid at hidden 1024."""
    from _common import bench_config

    from nemo_elastic.config import load_config

    if size == "tiny":
        cfg = load_config(Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml")
        import dataclasses

        return dataclasses.replace(cfg, elastic=None)
    return bench_config(int(size), "M-M*-M-", 512)


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [length] if batch == 1 else [length - 3 + i for i in range(batch)]
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def _speed(steppers, prompts, tokens: int, vocab: int, reps: int) -> float:
    """New tokens per second (all rows), median of `reps` timed runs."""
    from nemo_elastic.inference import decode_batch

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = decode_batch(steppers, prompts, max_new_tokens=tokens, eod_id=-1, vocab_size=vocab,
                           threads=None)  # --threads decides
        times.append(time.perf_counter() - t0)
        assert all(len(c.tokens) == tokens for c in out)
    return tokens * len(prompts) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "1024"])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per row")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (batch 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench_family import _family

    from nemo_elastic import runtime
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.export.slicing import slice_model
    from nemo_elastic.inference import cached, uncached
    from nemo_elastic.report.common import format_table
    from nemo_elastic.training.evaluation import greedy_logits_fn

    table = []
    for size in args.sizes:
        cfg = _config(size)
        vocab = cfg.model.vocab_size
        with runtime.distributed(ParallelConfig()):
            parent = build_elastic_model(cfg)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in parent.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
            rows = _family(cfg.model)
            models = {}
            for row in rows:
                # every budget, the full one too, as the plain model `generate` runs
                subnet = SubNetwork.from_dict(row["subnetwork"])
                models[row["name"]] = slice_model(parent, cfg, subnet)[1].eval()
            speeds = {}
            for batch in args.batches:
                prompts = _prompts(batch, args.prompt, vocab, seed=batch)
                for name, model in models.items():
                    steppers = cached(model)
                    _speed(steppers, prompts, args.tokens, vocab, 1)  # warm-up
                    fast = _speed(steppers, prompts, args.tokens, vocab, args.reps)
                    slow = _speed(uncached(greedy_logits_fn(model)), prompts, args.tokens,
                                  vocab, 1)
                    speeds[name, batch] = (fast, slow)
            for row in rows:
                for batch in args.batches:
                    fast, slow = speeds[row["name"], batch]
                    full = speeds["full", batch][0]
                    frac = row["parameter_fraction"]
                    table.append((
                        f"hidden {cfg.model.hidden_size}", row["name"],
                        f"{row['parameters']:,} ({frac:.2f})", str(batch), f"{fast:.1f}",
                        f"{slow:.1f}", f"{fast / slow:.1f}x", f"{fast / full:.2f}",
                        f"{0.8 / frac:.2f}"))
    print(format_table(("size", "budget", "parameters (fraction)", "batch", "cached tok/s",
                        "uncached tok/s", "cached / uncached", "speed vs full (cached)",
                        "goal 0.8 / fraction"), table))
    print(f"\n({args.tokens} new tokens per row after {args.prompt}-token prompts (batch 8: "
          f"{args.prompt - 3}..{args.prompt + 4}); tokens/s counts every row; cached: median of "
          f"{args.reps}, uncached: one run; {args.threads} thread(s); cpu count {os.cpu_count()})")


if __name__ == "__main__":
    main()
