"""Synthetic identity dataset: procedurally drawn faces written as WebDataset shards (the embedded default).

Every identity ``syn_<k>`` is a fixed parameter set drawn from ``numpy.random.default_rng([IDENTITY_NAMESPACE, k])``,
so ``syn_7`` is the same person in every dataset, whatever ``--seed`` is; the seed drives only which images are
drawn (identity assignment, pose, lighting, background, captions).

What carries identity (stable across an identity's images):
- moderate colours: skin tone, hair colour and hair style, lip colour;
- details that diffusion noise destroys early (a lesson from a prototype, where flat-colour identities let the
  denoiser ignore *which* identity it was given): a face-paint pattern (stripes / checker / dots / rings) of an
  identity-specific period, orientation, colour and region, eye shape and iris colour, eyebrow thickness and tilt,
  moles, optional glasses.

Nuisance per image: in-plane rotation, scale, position, lighting (brightness, contrast, colour cast, a lighting
gradient) and background (a two-colour gradient plus random shapes).

Geometry is exact by construction: each identity is drawn once on a canonical canvas whose five landmarks sit on
``ARCFACE_TEMPLATE_112`` (``src.conventions``), then warped into the image with a known similarity transform, so the
five landmarks, the face box (the face oval's extent) and the masks (filled boxes) come from the drawing. All
coordinates are continuous pixel coordinates (pixel ``i`` spans ``[i, i+1)``, centre ``i + 0.5``), the convention
of PIL's affine warps and of ``src.alignment.align_face``.

The aligned recognition/CLIP crops are cut from the same scene rendered at ``crop_scale`` (default 4) times the image
resolution, as real preparation cuts them from the full-resolution photo before the image is resized for training.
Cut from the 64 px image itself, a 14 px face of a three-person image was blown up ~5x into a blur that lost the
identity's eyes, moles, glasses and pattern.

Layout written by :func:`generate` (and ``python -m datamodules.synthetic --out DIR``)::

    DIR/single/train-000000.tar ...          one face, training identities
    DIR/multi/train-000000.tar ...           2..max_faces faces, distinct training identities
    DIR/heldout/single_seen-*.tar            new images of training identities
    DIR/heldout/single_unseen-*.tar          identities never seen in training
    DIR/heldout/multi_seen-*.tar, multi_unseen-*.tar
    DIR/manifest.json                        counts, identities, seed, options, brace pattern of each sp

Modules: `identities` (each identity's stable parameters and its label), `canonical` (one identity drawn on the
canonical canvas, and the cache of those renders), `scene` (placing faces, background, lighting: one sample with
its exact geometry and crops), `dataset` (the splits written as shards, over worker processes, and the manifest;
crops for pretraining the tiny face backbone). The command is `src/cli/synthetic.py`.
"""
