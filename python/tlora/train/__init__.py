"""Training from one image: the loop (loop.py) and its resumable checkpoints (checkpoint.py)."""
