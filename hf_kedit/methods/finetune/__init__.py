"""Fine-tuning baselines (LoRA): a low-rank delta trained on the edit."""
