"""Training phases: phase I (prompt tuning of one model) and phase II (full fine-tuning)."""
