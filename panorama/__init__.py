"""Spherical geometry shared by every part of pano-distill: rotations, equirect <-> cube, depth kinds.

All functions take batched torch tensors on any device, are differentiable where a prediction flows
through them, compute in float32 and accept fp16/bf16 inputs (returned in the input's dtype).
"""

from .depth import (
    depth_to_disparity,
    depth_to_normals,
    depth_to_points,
    disparity_to_depth,
    equirect_to_planar_faces,
    face_ray_scale,
    planar_faces_to_equirect,
    planar_to_radial,
    planar_to_radial_disparity,
    radial_to_planar,
    radial_to_planar_disparity,
)
from .projection import (
    FACE_NAMES,
    FACE_ROTATIONS,
    cube_to_equirect,
    equirect_directions,
    equirect_to_cube,
    face_directions,
    pinhole_directions,
    ray_face_coords,
)
from .rotation import euler_to_matrix, random_rotations, rotation_matrix

__all__ = [
    "FACE_NAMES", "FACE_ROTATIONS", "cube_to_equirect", "depth_to_disparity", "depth_to_normals", "depth_to_points",
    "disparity_to_depth", "equirect_directions", "equirect_to_cube", "equirect_to_planar_faces",
    "euler_to_matrix", "face_directions", "face_ray_scale", "pinhole_directions", "planar_faces_to_equirect",
    "planar_to_radial", "planar_to_radial_disparity", "radial_to_planar", "radial_to_planar_disparity",
    "random_rotations", "ray_face_coords", "rotation_matrix",
]
