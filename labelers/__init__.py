"""Pseudo-labelers (depth, normals, segmentation, detection, captions, CLIP features), one interface."""
