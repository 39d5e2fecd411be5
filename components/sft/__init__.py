"""QLoRA supervised fine-tuning of a SmolVLM/Idefics3 model with TRL's SFTTrainer."""
