"""Pseudo-labelers (depth, normals, segmentation, detection, captions, CLIP features): next stage."""
