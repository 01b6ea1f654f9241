"""Evaluation metrics as torchmetrics `Metric`s (training callbacks and `make eval`).

face.py     greedy_match, image_face_score, FaceSimilarity (Face Sim + multi-ID diagnostics)
multi_id.py hungarian_match, multi_id_score, MultiIdentityMetrics (MultiID-Bench Sim(Ref) and leakage,
            MultiHuman-Testbench count accuracy / ID similarity, UMO ID-Conf, greedy Face Sim)
clip.py     load_open_clip, ClipScore (CLIP-T / CLIP-I, cosine x 100)
routing.py  RoutingAccuracy (overall and per timestep band)
identity.py nearest_neighbour_identification (how much identity embeddings/tokens carry),
            other_identity_partners (the identity probe's "another person")
fid.py      fid_metric (torchmetrics FID, offline), TorchvisionInceptionFeatures

RANK_LOCAL: the keyword arguments of a metric computed on one rank only (the training callbacks measure on rank
0): torchmetrics would otherwise gather its state from every rank at `compute()`, a collective the other ranks
never join (a DDP run hangs there).
"""
from src.metrics.clip import ClipScore, load_open_clip
from src.metrics.face import FaceScore, FaceSimilarity, greedy_match, image_face_score
from src.metrics.fid import TorchvisionInceptionFeatures, fid_metric
from src.metrics.identity import nearest_neighbour_identification, other_identity_partners
from src.metrics.multi_id import MultiIdentityMetrics, MultiIdScore, hungarian_match, multi_id_score
from src.metrics.routing import BAND_NAMES, RoutingAccuracy

RANK_LOCAL = {"sync_on_compute": False}

__all__ = [
    "BAND_NAMES",
    "RANK_LOCAL",
    "ClipScore",
    "FaceScore",
    "FaceSimilarity",
    "MultiIdScore",
    "MultiIdentityMetrics",
    "RoutingAccuracy",
    "TorchvisionInceptionFeatures",
    "fid_metric",
    "greedy_match",
    "hungarian_match",
    "image_face_score",
    "load_open_clip",
    "multi_id_score",
    "nearest_neighbour_identification",
    "other_identity_partners",
]
