"""Frozen perspective depth teachers and the ways the training loop reaches them.

* ``models``: load any Hugging Face depth-estimation model (or our own, or tiny random ones), frozen,
  answering cube faces with relative disparity normalised per face.
* backends answering faces: ``InProcessTeacher``, ``RayTeacherPool`` (replicas with micro-batching,
  backpressure and restarts), ``ServiceClient`` (one pool shared by the workers of a cluster run);
* label sources answering panoramas: ``OnlineLabels``, ``CachedLabels`` (the precomputed store),
  ``HybridLabels``, and ``OracleLabels`` (exact disparity of generated scenes, for measurements).
"""

from .labels import CachedLabels, HybridLabels, OnlineLabels, PseudoLabels
from .models import DEFAULT_TEACHER, TEACHER_MODELS, FrozenTeacher, TeacherUnavailableError, load_teacher

__all__ = ["CachedLabels", "DEFAULT_TEACHER", "FrozenTeacher", "HybridLabels", "OnlineLabels", "PseudoLabels",
           "TEACHER_MODELS", "TeacherUnavailableError", "load_teacher"]
