"""Adapter files in and out: the one validating reader and writer (io.py), other tools'
T-LoRA layouts (foreign.py), exports to other LoRA formats (export.py), atomic writes (atomic.py)."""
