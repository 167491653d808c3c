"""Evaluation: PSNR and image grids."""

from ul_fast.eval.images import image_grid, psnr, save_grid, side_by_side

__all__ = ["image_grid", "psnr", "save_grid", "side_by_side"]
