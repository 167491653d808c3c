"""Evaluation: PSNR and image grids, Fréchet distance and KID on the features of a fixed network, and the
evaluation of a trained model (``ul-fast eval``)."""

from ul_fast.eval.evaluate import evaluate_model
from ul_fast.eval.feature_net import FEATURE_DIM, load_fmnist_classifier
from ul_fast.eval.frechet import feature_statistics, frechet_distance, kernel_inception_distance
from ul_fast.eval.images import image_grid, psnr, save_grid, side_by_side

__all__ = ["FEATURE_DIM", "evaluate_model", "feature_statistics", "frechet_distance", "image_grid",
           "kernel_inception_distance", "load_fmnist_classifier", "psnr", "save_grid", "side_by_side"]
