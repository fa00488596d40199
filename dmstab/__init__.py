"""dmstab: study and speed up diffusion-model training, tracked in MLflow."""

__version__ = "0.1.0"
