"""A nested checkpoint as a model family: disk size vs separate checkpoints, export time per
budget, generation speed per budget vs the parent (should track the parameter ratio).

A benchmark-sized hybrid (pattern `M-M*-M-M-`, hidden 256) with perturbed weights and a family
of three homogeneous budgets (every width axis at 100 / 75 / 50 %) written into its
`nemo_elastic.json`, as `nemo-elastic train` does.  Everything is measured side by side in one
process: `export --all` in both formats (each budget sliced, written, reloaded and verified),
then greedy stateful decoding of a fixed number of tokens (no early stop) with one loaded
`ElasticGenerator`, each budget on its sliced weights (median of `--reps`).
Run: `.venv/bin/python bench/bench_family.py [--tokens 32 --reps 3 --threads 2]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)

FRACTIONS = {"full": 1.0, "75pct": 0.75, "50pct": 0.5}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _family(m):
    from nemo_elastic.cost_model import MemorySpec, count_parameters, subnetwork_memory, \
        subnetwork_parameters
    from nemo_elastic.elastic.subnet import SubNetwork

    def at(f, n, step=1):
        return max(step, int(n * f) // step * step)

    rows = []
    for name, f in FRACTIONS.items():
        subnet = SubNetwork.uniform(
            m, hidden_size=at(f, m.hidden_size), ffn_hidden_size=at(f, m.ffn_hidden_size),
            mamba_num_heads=at(f, m.mamba_num_heads, m.mamba_num_groups),
            num_attention_heads=at(f, m.num_attention_heads, m.num_query_groups))
        params, spec = subnetwork_parameters(m, subnet), MemorySpec()
        rows.append({"name": name, "target": f, "budget_type": "params", "parameters": params,
                     "parameter_fraction": params / count_parameters(m),
                     "memory_bytes": subnetwork_memory(m, subnet, spec),
                     "memory_spec": {"batch_size": spec.batch_size, "seq_length": spec.seq_length,
                                     "bytes_per_param": spec.bytes_per_param},
                     "summary": subnet.describe(m), "subnetwork": subnet.to_dict()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from _common import bench_config

    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import save_checkpoint
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.data.protocol import document_ids
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.export import export_budgets
    from nemo_elastic.report.common import format_table
    from nemo_elastic.inference import generate_ids
    from nemo_elastic.serve import ElasticGenerator

    cfg = bench_config(args.hidden, "M-M*-M-M-", 512)
    rows = _family(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with runtime.distributed(ParallelConfig()):
            model = build_elastic_model(cfg)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
            save_checkpoint(tmp / "nested", cfg=cfg, model=model, kind="elastic",
                            extra_meta={"family": rows})
            del model
        exports = {}
        for fmt in ("megatron", "hf"):
            exports[fmt] = {r.name: r for r in export_budgets(tmp / "nested", tmp / fmt, None,
                                                              format=fmt)}
        nested = _size(tmp / "nested")
        sizes = {fmt: {n: _size(r.path) for n, r in e.items()} for fmt, e in exports.items()}

        speed = {}
        with ElasticGenerator.load(tmp / "nested") as g:
            ids = document_ids(g.tokenizer, "Q:12+7*3=?\nS:", append_eod=False)
            for name in FRACTIONS:
                model = g.model(name)
                times = []
                for _ in range(args.reps + 1):  # first call: warm-up
                    t0 = time.perf_counter()
                    out = generate_ids(model, [ids], max_new_tokens=args.tokens, eod_id=-1,
                                       vocab_size=g.tokenizer.vocab_size)[0].tokens
                    times.append(time.perf_counter() - t0)
                assert len(out) == args.tokens
                speed[name] = args.tokens / statistics.median(times[1:])

    full_params = rows[0]["parameters"]
    table = []
    for row in rows:
        n = row["name"]
        table.append((n, f"{row['parameters']:,}", f"{row['parameters'] / full_params:.2f}",
                      f"{sizes['megatron'][n] / 1e6:.2f}", f"{exports['megatron'][n].seconds:.2f}",
                      f"{exports['hf'][n].seconds:.2f}", f"{speed[n]:.1f}",
                      f"{speed[n] / speed['full']:.2f}", f"{full_params / row['parameters']:.2f}"))
    print(format_table(("budget", "parameters", "fraction", "Megatron MB", "export s (Megatron)",
                        "export s (HF)", "tokens/s", "speed vs full", "1 / fraction"), table))
    total = sum(sizes["megatron"].values())
    print(f"\nnested checkpoint on disk: {nested / 1e6:.2f} MB; the {len(rows)} budgets as "
          f"separate Megatron checkpoints: {total / 1e6:.2f} MB ({total / nested:.2f}x), as HF "
          f"folders: {sum(sizes['hf'].values()) / 1e6:.2f} MB")
    print(f"(pattern M-M*-M-M-, hidden {args.hidden}, {args.tokens} new tokens with the KV cache "
          f"and Mamba states (bench_decode.py compares with a full forward per token); "
          f"{args.threads} threads, median "
          f"of {args.reps}; cpu count {os.cpu_count()})")


if __name__ == "__main__":
    main()
