"""RunPod serverless worker for SDXL images and WAN 2.1 video."""

__version__ = "0.1.0"
