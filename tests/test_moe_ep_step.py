"""An elastic distillation training step of a MoE parent at expert parallelism 2 (two gloo
ranks, 4 of the 8 experts each, one micro-batch per rank) equals one process running both
micro-batches.  As in the trainer, every data-parallel (= expert-parallel here) rank draws the
same budget and Gumbel noise for its micro-batch index: the all-gather dispatcher sends every
rank's tokens through each rank's experts under that rank's masks, so the ranks of an EP group
must run the same sub-network.  Compared: the router's sub-network, the student (sliced
execution: the kept experts, expert and shared widths) and the frozen teacher, the KD + budget
loss of each micro-batch, and every gradient (student weights and the budget router's)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import perturb, tiny_config

MOE = dict(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24,
           moe_shared_expert_intermediate_size=16, moe_router_topk_scaling_factor=2.5)
ELASTIC = {"iters": 10, "warmup_iters": 0, "budgets": {"full": 1.0, "b50": 0.5},
           "axes": ["hidden", "mamba_heads", "moe_experts", "moe_expert_ffn", "moe_shared_ffn"],
           "heterogeneous": ["moe_experts"], "execution": "sliced", "budget_type": "active"}
PROBS = [0.0, 1.0]  # every micro-batch trains the b50 budget (pruned), with its own noise
ITERATION = 3


def _cfg(ep: int):
    return tiny_config({"hybrid_layer_pattern": "ME*E", "moe": MOE},
                       parallel={"expert_model_parallel_size": ep}, elastic=ELASTIC)


def _batch(tokens):
    b, s = tokens.shape
    return {"tokens": tokens, "position_ids": torch.arange(s).expand(b, s), "labels": tokens,
            "loss_mask": torch.ones(b, s)}


def _step_parts(cfg, ckpt):
    """(student, teacher, router, step) loaded from `ckpt` under the current parallel state."""
    from nemo_elastic.checkpoint import load_checkpoint
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.model import build_hybrid_model
    from nemo_elastic.router import ElasticRouter
    from nemo_elastic.training.elastic.step import ElasticDistillationStep

    student, teacher = build_elastic_model(cfg), build_hybrid_model(cfg)
    for model in (student, teacher):
        load_checkpoint(ckpt, model=model, restore_rng=False)
    teacher.eval()
    router = ElasticRouter(cfg.model, cfg.elastic, total_iters=10)
    step = ElasticDistillationStep(router=router, teacher=teacher, elastic_cfg=cfg.elastic)
    return student, teacher, router, step


def _micro_batch(step, student, tokens, micro: int):
    """One micro-batch of the step at position `micro` of iteration ITERATION -> its loss sum
    (KD + budget) and the sub-network the router drew."""
    step.begin_iteration(ITERATION, PROBS)
    step.micro_batch = micro
    out, loss_fn = step(iter([_batch(tokens)]), student)
    total, _, _ = loss_fn(out)
    subnet = step.router(step.budgets_drawn[0], iteration=ITERATION, micro_batch=micro)
    return total, subnet.subnetwork.hard()


def _ep_rank(rank, world_size, ckpt, tokens_path, out_dir):
    from nemo_elastic import runtime

    cfg = _cfg(ep=2)
    with runtime.distributed(cfg.parallel):
        import torch.distributed as dist

        student, _, router, step = _step_parts(cfg, ckpt)
        tokens = torch.load(tokens_path)[rank]
        total, subnet = _micro_batch(step, student, tokens, micro=0)  # as every DP rank does
        total.backward()
        grads = {}
        for prefix, module in (("student.", student), ("router.", router)):
            for name, p in module.named_parameters():
                if p.grad is None:
                    continue
                if ".local_experts." in name:  # this rank's experts: rank * 4 + local index
                    local = int(name.split(".local_experts.")[1].split(".")[0])
                    name = name.replace(f".local_experts.{local}.",
                                        f".local_experts.{rank * 4 + local}.")
                    grads[prefix + name] = p.grad.clone()
                else:  # replicated: sum over the two ranks' micro-batches
                    grad = p.grad.clone()
                    dist.all_reduce(grad)
                    grads[prefix + name] = grad
        torch.save({"loss": total.detach(), "grads": grads, "subnet": subnet.to_dict()},
                   f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_elastic_step_ep2_equals_ep1(tmp_path):
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import save_checkpoint
    from nemo_elastic.elastic.specs import build_elastic_model
    from tests.multiproc import run_multiprocess

    cfg = _cfg(ep=1)
    tokens = torch.randint(0, 64, (2, 2, 24), generator=torch.Generator().manual_seed(7))
    with runtime.distributed(cfg.parallel):
        parent = perturb(build_elastic_model(cfg), seed=2)
        gen = torch.Generator().manual_seed(13)
        with torch.no_grad():  # a score-correction bias that changes the routing
            for name, buf in parent.named_buffers():
                if name.endswith("router.expert_bias"):
                    buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
        save_checkpoint(tmp_path / "ckpt", cfg=cfg, model=parent, kind="test")
        student, _, router, step = _step_parts(cfg, tmp_path / "ckpt")
        losses, subnets = [], []
        for r in range(2):  # rank r's micro-batch, at micro-batch index 0 as on rank r
            total, subnet = _micro_batch(step, student, tokens[r], 0)
            losses.append(total)
            subnets.append(subnet)
        sum(losses).backward()
        reference = {f"{prefix}{n}": p.grad.clone()
                     for prefix, module in (("student.", student), ("router.", router))
                     for n, p in module.named_parameters() if p.grad is not None}
    # the drawn sub-networks prune experts (per layer) and widths: the test exercises them
    for s in subnets:
        moe = [layer for layer in s.layers if layer.num_moe_experts is not None]
        assert any(layer.num_moe_experts < MOE["num_moe_experts"] for layer in moe), s
    torch.save(tokens, tmp_path / "tokens.pt")
    run_multiprocess(_ep_rank, 2, tmp_path / "ckpt", tmp_path / "tokens.pt", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in range(2):
        assert ranks[r]["subnet"] == subnets[r].to_dict()
        assert torch.allclose(ranks[r]["loss"], losses[r].detach(), rtol=1e-5), \
            (ranks[r]["loss"], losses[r])
    grads = {**ranks[0]["grads"], **ranks[1]["grads"]}
    assert sorted(grads) == sorted(reference)
    assert any(n.startswith("router.") for n in reference)  # the budget router learns too
    for name, ref in reference.items():
        assert torch.allclose(grads[name], ref, rtol=1e-4, atol=1e-6), \
            (name, (grads[name] - ref).abs().max())
