"""Cost of one elastic distillation micro-batch step relative to a plain pretrain step.

Side by side in one process, same weights, same tokens, interleaved repetitions (median):

  pretrain step             HybridModel forward + backward with the LM loss (the parent)
  elastic <budget> <mode>   ElasticDistillationStep at that budget: router + masked student
                            forward/backward + frozen teacher forward + KD + budget loss
  teacher forward           the frozen teacher alone (no grad): its share of an elastic step

Masks zero work out but do not remove it, so every budget costs about the same; the router's
hard mode (argmax prefix x probability) and soft mode (mixture of prefixes) differ only in the
mask arithmetic.

Run: `.venv/bin/python bench/bench_train_step.py [--hidden 256 --seq 256 --batch 4 --reps 5]`.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--pattern", default="M-M*-M-M-")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from _common import bench_config, median_times
    from nemo_elastic import runtime
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.model import build_hybrid_model
    from nemo_elastic.report.common import format_table
    from nemo_elastic.router import ElasticRouter
    from nemo_elastic.training.elastic.step import ElasticDistillationStep

    h = args.hidden
    budgets = {"full": 1.0, "75pct": 0.75, "50pct": 0.5}
    cfg = bench_config(h, args.pattern, args.seq)
    m = cfg.model
    with runtime.distributed(ParallelConfig()):
        plain = build_hybrid_model(cfg)
        student = build_elastic_model(cfg)
        student.load_state_dict(plain.state_dict())
        teacher = build_elastic_model(cfg)
        teacher.load_state_dict(plain.state_dict())
        teacher.eval().requires_grad_(False)
        tokens = torch.randint(0, m.vocab_size, (args.batch, args.seq))
        batch = {"tokens": tokens, "labels": tokens, "position_ids":
                 torch.arange(args.seq).expand_as(tokens), "loss_mask": torch.ones_like(tokens)}

        steps = {}
        for mode in ("hard", "soft"):
            e = bench_config(h, args.pattern, args.seq, elastic={
                "budgets": budgets, "iters": 100, "warmup_iters": 0,
                "router": {"mode": mode}, "execution": "masked"}).elastic
            router = ElasticRouter(m, e, total_iters=100)
            steps[mode] = (ElasticDistillationStep(router=router, teacher=teacher, elastic_cfg=e),
                           router)

        def pretrain_step():
            plain.zero_grad(set_to_none=True)
            plain(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean().backward()

        def elastic_step(mode: str, index: int):
            step, router = steps[mode]
            student.zero_grad(set_to_none=True)
            router.zero_grad(set_to_none=True)
            probs = [0.0] * len(budgets)
            probs[index] = 1.0
            step.begin_iteration(50, probs)
            out, loss_fn = step(iter([batch]), student)
            total, n_tokens, _ = loss_fn(out)
            (total / n_tokens).backward()

        def teacher_forward():
            with torch.no_grad():
                teacher(batch["tokens"], batch["position_ids"], None)

        cases = {"pretrain step (parent)": pretrain_step, "teacher forward": teacher_forward}
        for mode in ("hard", "soft"):
            for i, name in enumerate(budgets):
                cases[f"elastic {name} {mode}"] = (lambda mode=mode, i=i: elastic_step(mode, i))
        med = median_times(cases, args.reps)
        base, teach = med["pretrain step (parent)"], med["teacher forward"]
        rows = [(name, f"{t * 1e3:.1f}", f"{t / base:.2f}",
                 f"{teach / t:.0%}" if name.startswith("elastic") else "-")
                for name, t in med.items()]
    print(f"one micro-batch, pattern {m.hybrid_layer_pattern}, hidden {h}, batch {args.batch} x "
          f"seq {args.seq}, {args.threads} threads, median of {args.reps}")
    print(format_table(("case", "ms", "ratio vs pretrain step", "teacher share"), rows))


if __name__ == "__main__":
    main()
