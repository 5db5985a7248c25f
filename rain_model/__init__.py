"""RAIN (Resolution Adaptation and re-Identification Network, AAAI 2019) in plain PyTorch.

Submodules: ``config`` (frozen configs), ``backbone`` (F), ``decoder`` (G), ``discriminator`` (D_j),
``network`` (RAIN), ``losses`` (Eq. 1-6), ``objective`` (Eq. 7-8: one training step), ``sampler``
(P x K identity-balanced batches). Nothing is imported here, so importing the package does no work.
"""
