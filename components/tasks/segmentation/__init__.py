"""Semantic segmentation (AutoLoss-Zero A.1, Auto Seg-Loss): datasets, models, metrics, baselines, the
screening probe and the proxy/re-training trainers."""
