"""ferroquant: GPTQ post-training quantization with a Rust core."""

__version__ = "0.1.0"
