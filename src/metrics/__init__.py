"""Evaluation metrics as torchmetrics `Metric`s (training callbacks and `make eval`).

face.py     greedy_match, image_face_score, FaceSimilarity (Face Sim + multi-ID diagnostics)
clip.py     load_open_clip, ClipScore (CLIP-T / CLIP-I, cosine x 100)
routing.py  RoutingAccuracy (overall and per timestep band)
identity.py nearest_neighbour_identification (how much identity embeddings/tokens carry),
            other_identity_partners (the identity probe's "another person")
fid.py      fid_metric (torchmetrics FID, offline), TorchvisionInceptionFeatures
"""
from src.metrics.clip import ClipScore, load_open_clip
from src.metrics.face import FaceScore, FaceSimilarity, greedy_match, image_face_score
from src.metrics.fid import TorchvisionInceptionFeatures, fid_metric
from src.metrics.identity import nearest_neighbour_identification, other_identity_partners
from src.metrics.routing import BAND_NAMES, RoutingAccuracy

__all__ = [
    "BAND_NAMES",
    "ClipScore",
    "FaceScore",
    "FaceSimilarity",
    "RoutingAccuracy",
    "TorchvisionInceptionFeatures",
    "fid_metric",
    "greedy_match",
    "image_face_score",
    "load_open_clip",
    "nearest_neighbour_identification",
    "other_identity_partners",
]
