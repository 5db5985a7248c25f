"""Evaluation under the MLR protocol: scoring a trained model (CMC, mAP) and the pictures and tables."""
