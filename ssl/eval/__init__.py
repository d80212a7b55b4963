"""Downstream evaluation of exported backbones: features, linear probes, kNN, segmentation heads and data.

The entry points (`ssl.linear_eval`, `ssl.finetune`, `ssl.segment`) are thin Hydra wrappers over these
modules; everything here takes tensors and modules, so it is usable (and tested) without Hydra.
"""
