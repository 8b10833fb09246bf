"""IMSCT: cascaded segmentation of intramedullary spinal cord tumours (Lemay et al. 2021).

The library is the single home of the networks, geometry, cascade, post-processing, metrics and
phantom generator; the MONAI bundle (``bundle/``) and the MONAI Label app are thin front doors.
"""

__version__ = "0.1.0"
