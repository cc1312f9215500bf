"""Tuning advice measured on this machine (aidc.tune.prefetch: DataLoader workers and prefetch)."""
