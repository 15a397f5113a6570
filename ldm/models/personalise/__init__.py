"""Personalisation trained through main.py: adapters on a frozen base model (textual inversion, LoRA,
hypernetworks; see adapter_training.py) and DreamBooth fine-tuning."""
