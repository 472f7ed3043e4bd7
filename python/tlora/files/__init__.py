"""Adapter files in and out: the one validating reader and writer (io.py), other tools'
T-LoRA layouts (foreign/, a parser per layout), exports to other LoRA formats (export/, a writer
per format), atomic writes (atomic.py)."""
