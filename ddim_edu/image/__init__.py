"""The image leg: the DDPM UNet, image data, pretrained weights, training and resumable generation."""

__all__ = ["data", "generate", "grids", "pretrained", "training", "unet"]
