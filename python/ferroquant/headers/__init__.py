"""What a checkpoint's config.json and safetensors headers say, read and checked without torch
(so ``ferroquant inspect`` starts fast); the torch-side readers in ``ferroquant.formats`` build
on the same rules."""
