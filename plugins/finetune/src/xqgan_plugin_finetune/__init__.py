"""Fine-tuning adapters: ``frozen`` (freeze chosen parts) and ``lora`` (low-rank updates of conv/linear layers)."""
