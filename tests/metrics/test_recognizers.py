"""Face recognisers on real photographs (package sample photos, ../shared/data/celeba_eval when present)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.metrics import FaceSimilarity
from src.recognizers import DlibRecognizer, FaceNetRecognizer, FaceRecognizer, build_recognizer

CELEBA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "celeba_eval"


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # (512, 512, 3) uint8


def small_astronaut() -> np.ndarray:
    """(256, 256, 3) uint8: half size keeps the MTCNN tests quick (the face is still ~45 px)."""
    return np.asarray(Image.fromarray(astronaut()).resize((256, 256), Image.Resampling.BILINEAR))


def grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        return np.asarray(im.convert("RGB"))  # (600, 512, 3) uint8


def flipped_recrop(image: np.ndarray) -> np.ndarray:
    """Horizontal flip, then a crop dropping ~5% of each border (another view of the same photo)."""
    h, w = image.shape[:2]
    dy, dx = h // 20, w // 20
    return np.ascontiguousarray(image[dy : h - dy, ::-1][:, dx : w - dx])


@pytest.fixture(scope="module")
def dlib_rec() -> DlibRecognizer:
    return DlibRecognizer()


def test_dlib_embeddings_shape_order_and_protocol(dlib_rec):
    assert isinstance(dlib_rec, FaceRecognizer)
    emb, boxes = dlib_rec.embed_faces(astronaut())
    assert emb.shape[0] == boxes.shape[0] >= 1 and emb.shape[1] == 128 and boxes.shape[1] == 4
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-5)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert torch.all(area[:-1] >= area[1:])  # largest first
    ref = dlib_rec.embed_reference(astronaut())
    assert torch.allclose(ref, emb[0])


def test_dlib_recognizer_deepcopies_with_its_config(dlib_rec):
    import copy

    metric = FaceSimilarity(DlibRecognizer(upsample=0, mtcnn_fallback=False))
    clone = copy.deepcopy(metric)  # dlib's models do not pickle: the recogniser rebuilds itself
    assert clone.recognizer.upsample == 0 and clone.recognizer.mtcnn is None
    a = astronaut()
    assert torch.allclose(clone.recognizer.embed_faces(a)[0], metric.recognizer.embed_faces(a)[0])


def test_dlib_no_face(dlib_rec):
    blank = np.full((96, 96, 3), 128, dtype=np.uint8)
    emb, boxes = dlib_rec.embed_faces(blank)
    assert emb.shape == (0, 128) and boxes.shape == (0, 4)
    assert dlib_rec.embed_reference(blank) is None


def test_dlib_falls_back_to_mtcnn_boxes():
    strict = DlibRecognizer(score_threshold=100.0)  # dlib's detector finds nothing at this threshold
    emb, boxes = strict.embed_faces(small_astronaut())
    assert emb.shape[0] >= 1 and emb.shape[1] == 128  # faces from the MTCNN boxes
    no_fallback = DlibRecognizer(score_threshold=100.0, mtcnn_fallback=False)
    assert no_fallback.embed_faces(small_astronaut())[0].shape == (0, 128)


def test_dlib_same_person_scores_higher_than_different_people(dlib_rec):
    a, g = astronaut(), grace_hopper()
    ea, eg = dlib_rec.embed_reference(a), dlib_rec.embed_reference(g)
    ea_flip, eg_flip = dlib_rec.embed_reference(flipped_recrop(a)), dlib_rec.embed_reference(flipped_recrop(g))
    different = float(ea @ eg)
    assert float(ea @ ea_flip) > different
    assert float(eg @ eg_flip) > different


def test_dlib_face_similarity_metric_end_to_end(dlib_rec):
    a, g = astronaut(), grace_hopper()
    ref = dlib_rec.embed_reference(a)
    same, other = FaceSimilarity(dlib_rec), FaceSimilarity(dlib_rec)
    same.update([flipped_recrop(a)], [ref])
    other.update([g], [ref])
    assert float(same.compute()["face_sim"]) > float(other.compute()["face_sim"])


def test_dlib_on_celeba_eval(dlib_rec):
    paths = sorted(CELEBA_DIR.glob("*.jpg"))
    if len(paths) < 2:
        pytest.skip(f"no CelebA eval photos in {CELEBA_DIR}")
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    refs = [dlib_rec.embed_reference(p) for p in photos]
    flips = [dlib_rec.embed_reference(flipped_recrop(p)) for p in photos]
    assert all(r is not None for r in refs + flips), [str(p) for p, r in zip(paths, refs) if r is None]
    ref_m, flip_m = torch.stack(refs), torch.stack(flips)  # (P, 128) each
    cross = ref_m @ ref_m.T  # (P, P) different people off the diagonal
    cross.fill_diagonal_(-1)
    same = (ref_m * flip_m).sum(-1)  # (P,) photo vs its flipped, re-cropped copy
    for i, p in enumerate(paths):
        assert same[i] > cross[i].max(), f"{p.name}: same {same[i]:.3f} <= different {cross[i].max():.3f}"


# ----------------------------------------------------------------------------- FaceNet
@pytest.fixture(scope="module")
def facenet_weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Random InceptionResnetV1 weights saved like the released vggface2 .pt (a plain state dict
    that also holds the 8631-way `logits` classifier)."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    state = InceptionResnetV1(pretrained=None, classify=True, num_classes=8631).state_dict()
    assert "logits.weight" in state
    path = tmp_path_factory.mktemp("facenet") / "20180402-114759-vggface2.pt"
    torch.save(state, path)
    return path, state


def test_facenet_loads_local_weights_and_embeds(facenet_weights):
    path, state = facenet_weights
    rec = FaceNetRecognizer(path)
    for k, v in rec.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    image = small_astronaut()
    emb, boxes = rec.embed_faces(image)
    assert emb.shape[0] == boxes.shape[0] >= 1 and emb.shape[1] == 512
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-5)
    assert torch.allclose(rec.embed_reference(image), emb[0])  # deterministic
    assert rec.embed_faces(np.full((96, 96, 3), 128, dtype=np.uint8))[0].shape == (0, 512)
    # The crops are those of facenet-pytorch's own MTCNN forward (PIL path): the FastComposer protocol.
    expected = rec.mtcnn(Image.fromarray(image))  # (K, 3, 160, 160) standardised
    assert torch.allclose(rec.crops(image, boxes.numpy()), expected, atol=1e-5)


def test_facenet_weight_errors(tmp_path, facenet_weights):
    missing = tmp_path / "no-such-vggface2.pt"
    with pytest.raises(FileNotFoundError, match="no-such-vggface2.pt"):
        FaceNetRecognizer(missing)
    wrong = tmp_path / "wrong-keys.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="wrong-keys.pt"):
        FaceNetRecognizer(wrong)
    with pytest.raises(ValueError, match="allow_random"):
        FaceNetRecognizer(None)
    with pytest.warns(UserWarning, match="RANDOM"):
        FaceNetRecognizer(None, allow_random=True)


def test_build_recognizer():
    assert isinstance(build_recognizer("dlib"), DlibRecognizer)
    with pytest.raises(ValueError, match="'arcface'"):
        build_recognizer("arcface")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_recognizer("facenet", weights="absent.pt")
