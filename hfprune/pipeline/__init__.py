"""The layer that knows recipes, files, the command line and the Hub: tasks, runs, sweeps, reports, model cards and
pushing. Imports any layer below it; nothing below imports it."""
