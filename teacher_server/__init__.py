"""Frozen perspective depth teachers and the ways the training loop reaches them.

* ``models``: load any Hugging Face depth-estimation model (or our own), frozen, answering cube faces
  with relative disparity normalised per face; ``testing``: tiny random and toy models (tests, CI).
* backends answering faces: ``InProcessTeacher``, ``RayTeacherPool`` (``pool``: replicas with
  micro-batching, backpressure and restarts, built from ``replica``, ``records`` and ``scheduler``),
  ``ServiceClient`` (one pool shared by the workers of a cluster run);
* ``precompute``: the teacher's answers cached in an LMDB store (``precompute_ray``: as Ray Data);
* label sources answering panoramas: ``OnlineLabels``, ``CachedLabels`` (the precomputed store),
  ``HybridLabels``, and ``OracleLabels`` (exact disparity of generated scenes, for measurements).
"""

from .labels import CachedLabels, HybridLabels, OnlineLabels, PseudoLabels
from .models import DEFAULT_TEACHER, TEACHER_MODELS, FrozenTeacher, TeacherUnavailableError, load_teacher

__all__ = ["CachedLabels", "DEFAULT_TEACHER", "FrozenTeacher", "HybridLabels", "OnlineLabels", "PseudoLabels",
           "TEACHER_MODELS", "TeacherUnavailableError", "load_teacher"]
