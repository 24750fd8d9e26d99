"""enn-neuro: Eigen Neural Networks for 3D brain MRI cohorts and 2D image folders."""

__version__ = "0.1.0"
