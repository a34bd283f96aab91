"""Forward-KL distillation loss: a float64 oracle, and vocab-parallel TP=2 == TP=1 (with grads)."""

import pytest
import torch

from nemo_elastic import runtime
from nemo_elastic.distill import forward_kl, masked_mean
from tests.multiproc import run_multiprocess


def _oracle(student, teacher, temperature):
    s, t = student.double() / temperature, teacher.double() / temperature
    p_t = torch.softmax(t, -1)
    return (p_t * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_matches_oracle_and_is_zero_for_equal_logits(temperature):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    kl = forward_kl(student, teacher, temperature=temperature)
    torch.testing.assert_close(kl.double(), _oracle(student, teacher, temperature), rtol=1e-5, atol=1e-6)
    assert (kl > 0).all()
    assert forward_kl(teacher, teacher).abs().max() < 1e-6
    reference = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                           log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(student, teacher), reference, rtol=1e-5, atol=1e-6)


def test_teacher_is_frozen_and_mask():
    student = torch.randn(2, 3, 7, requires_grad=True)
    teacher = torch.randn(2, 3, 7, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = masked_mean(forward_kl(student, teacher), mask)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    assert torch.equal(student.grad[0, 2], torch.zeros(7))
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(student, teacher[..., :6])


def _tp2(rank, world_size, path):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    data = torch.load(path)
    v = data["student"].shape[-1] // world_size
    student = data["student"][..., rank * v:(rank + 1) * v].clone().requires_grad_()
    teacher = data["teacher"][..., rank * v:(rank + 1) * v]
    loss = masked_mean(forward_kl(student, teacher, temperature=1.5, tp_group=dist.group.WORLD),
                       data["mask"])
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": student.grad}, f"{path}.{rank}")
    runtime.destroy()


@pytest.mark.slow
def test_vocab_parallel_tp2_equals_tp1(tmp_path):
    gen = torch.Generator().manual_seed(1)
    data = {"student": torch.randn(2, 6, 16, generator=gen) * 3,
            "teacher": torch.randn(2, 6, 16, generator=gen) * 3,
            "mask": (torch.rand(2, 6, generator=gen) > 0.3).float()}
    torch.save(data, tmp_path / "data.pt")
    student = data["student"].clone().requires_grad_()
    loss = masked_mean(forward_kl(student, data["teacher"], temperature=1.5), data["mask"])
    loss.backward()
    run_multiprocess(_tp2, 2, str(tmp_path / "data.pt"))
    parts = [torch.load(tmp_path / f"data.pt.{r}") for r in range(2)]
    for part in parts:
        torch.testing.assert_close(part["loss"], loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts], -1), student.grad,
                               rtol=1e-5, atol=1e-7)
