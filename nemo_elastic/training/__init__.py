"""Training: Megatron-Core schedules, optimizer, checkpoint/resume, evaluation."""
