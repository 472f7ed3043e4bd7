"""What tests and benchmarks share: tiny diffusers models built from configs (tiny.py), the
corpus of corrupted adapter files and checkpoints (fuzz_corpus.py) and training inputs
(train_inputs.py). Nothing here downloads."""
