"""Direct preference optimisation (TRL DPOTrainer) starting from the SFT adapter."""
