"""gitract: a 2.5D U-Net pipeline for the UW-Madison GI Tract Image Segmentation competition."""

__version__ = "0.1.0"
