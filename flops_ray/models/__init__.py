"""Model sources: flops_ray's own models and timm by name, layer groups, losses, black boxes and prompts."""
