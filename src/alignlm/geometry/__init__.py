"""Geometry of the joint space: how far apart, and how alike, the visual and text representations are."""
