"""Choosing what to remove and repairing the model: importance criteria, budgets, schedules, one-shot pruning, the
Trainer callback, retraining-free recovery and layer dropping. Imports hfprune.core only."""
