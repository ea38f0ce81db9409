"""Layer 3, the models: the AnimationBackend protocol (`base`), the toy and Wan-Animate
backends, LoRA through peft (`lora`), generation over any backend (`generate`), and a factory
over local folders only (`factory`: no model registry here)."""
