"""Base models: loading (``load``), LoRA wrapping through PEFT (``lora``), quantization (``quant``)."""
