"""Cases for the time-series families (filled in per family)."""
