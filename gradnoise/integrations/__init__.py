"""The noise scale and the adaptive batch inside the trainers users already
run (docs/design.md §11): `gradnoise.integrations.lightning` (PyTorch
Lightning callbacks) and `gradnoise.integrations.transformers` (Hugging Face
Trainer callbacks). Each imports its framework, so import the one you use."""
