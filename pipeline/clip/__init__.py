"""The CLIP engine: loading (open_clip), prompts, MaskCLIP dense scores, softmax-GradCAM."""
