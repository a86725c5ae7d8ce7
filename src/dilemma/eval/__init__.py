"""Evaluation read-outs on frozen or fine-tuned backbones."""

from dilemma.eval.features import extract_features
from dilemma.eval.knn import KNNResult, knn_eval, knn_predict

__all__ = ["KNNResult", "extract_features", "knn_eval", "knn_predict"]
