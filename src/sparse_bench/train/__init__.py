"""Trainer, optimizer and LR schedules, checkpoints, metric logging."""
