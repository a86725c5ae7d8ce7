"""Training: the loop, schedules, checkpoints and distributed helpers."""
