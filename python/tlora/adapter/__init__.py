"""Model surgery: `inject` / `Adapter` / `remove` (inject.py), which modules to adapt
(targets.py) and quantized frozen bases (quantized.py)."""
