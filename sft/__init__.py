"""sft: LoRA / QLoRA supervised fine-tuning on Xeon CPUs and NVIDIA GPUs."""

__version__ = "0.1.0"
