"""Fine-tuning baselines trained on the edit: low-rank deltas through PEFT (LoRA, AdaLoRA) and a
constrained dense one (FT-L)."""
