"""A tiny synthetic world for offline T-LoRA experiments.

Nothing can be downloaded, so the project pretrains its own small text-to-image model on seeded
32x32 scenes with exact captions (`world`), customises it on patterned sprites it never saw
(`concepts`), and judges the results with pixel metrics (`metrics`) instead of CLIP/DINO.
"""
