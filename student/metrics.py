"""Depth metrics and alignment protocols of the student's evaluation.

The implementation lives in ``panorama.depth_math`` (one copy, shared with the teacher tools and the
benches; its docstring states the protocols and cites the reference code). ``lstsq``, the Depth Anywhere
reference code's protocol, is the default; ``median`` (the paper's text) stays available.
"""

from __future__ import annotations

from panorama.depth_math import (DEFAULT_PROTOCOL, METRIC_NAMES, PROTOCOLS, REFERENCE_CROP, MetricAccumulator,
                                 align_prediction, depth_metrics, fit_scale_shift, other_protocol,
                                 per_image_metrics, stanford2d3d_crop, valid_mask)

__all__ = ["DEFAULT_PROTOCOL", "METRIC_NAMES", "PROTOCOLS", "REFERENCE_CROP", "MetricAccumulator", "align_prediction",
           "depth_metrics", "fit_scale_shift", "other_protocol", "per_image_metrics", "stanford2d3d_crop",
           "valid_mask"]
