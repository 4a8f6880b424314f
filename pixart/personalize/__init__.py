"""Perfusion (Tewel et al., 2023): a concept as a gated, key-locked rank-one edit of every block's
cross-attention K/V projection, learned with its token embedding from a handful of images."""
