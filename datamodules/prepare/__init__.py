"""Turn raw photos, img2dataset-style shards or the CelebA layout into training shards.

    python -m datamodules.prepare --input photos/ --format folder --out data/shards \\
        --captions captions.jsonl --max-faces 1

Inputs (``--format``):
  folder  a directory of images (.jpg .jpeg .png .webp .bmp), searched recursively. Images inside
          a sub-folder get that first-level sub-folder's name as identity label. A sidecar
          ``<stem>.txt`` next to an image is its source text.
  wds     img2dataset-style WebDataset shards: a .tar file, a directory of .tar files, or a
          glob / brace pattern (``shards/{00000..00009}.tar``). Samples hold ``jpg`` (or jpeg,
          png, webp), ``txt`` (source text) and ``json`` (its ``caption`` is used if no txt).
  celeba  the CelebA layout: ``img_align_celeba/``, ``identity_CelebA.txt`` (identity labels),
          optionally ``list_landmarks_align_celeba.txt``; its landmarks are used as a fallback
          when MTCNN finds no face (``--no-landmark-fallback`` disables this).
          ``list_bbox_celeba.txt`` refers to the in-the-wild images and is not used.

Per image: decode (unreadable -> dropped), downscale so the longer side <= --resolution-max,
detect faces with MTCNN on a copy whose longer side is <= --detect-size (default 640, 0 = full
resolution; boxes and landmarks are mapped back, and faces under about 20 / scale px, 32 px for
1024 -> 640, are not searched), batched over --detect-batch inputs whose copies have the same size,
MTCNN's networks on channels-last inputs (--no-detect-channels-last: facenet-pytorch's detect_face as shipped),
retry once on a padded copy, filter, align crops (112 recognition + --clip-size CLIP crops) at full
resolution, masks from boxes, caption. Drop reasons, checked in this order: ``unreadable``,
``image_too_small`` (shorter side under MTCNN's 20 px minimum face size), ``no_face`` (nothing
detected), ``low_confidence`` (no face with prob >= --min-prob), ``too_small`` (no confident face
with a box side >= --min-face-size), ``too_few_faces`` / ``too_many_faces`` (the confident,
large-enough faces number outside [--min-faces, --max-faces]). Smaller or less confident faces are
not kept and do not count.
When an identity label is known it is given to the largest face.

Captions: the --captions JSONL (keyed by relative path, its stem, file name or wds key), then the
--captioner model when given, then the source text, then "a photo of a person" / "... N people".

Output: ``DIR/shard-000000.tar``, ... in the schema of `datamodules.schema` (inputs i*S..(i+1)*S-1
of the sorted input list go to shard i, S = --samples-per-shard; dropped inputs leave gaps), each
written as ``.tar.tmp`` and renamed when complete; ``DIR/manifest.json`` holds the settings, the
per-shard and total counts kept / dropped by reason, the completed shards and the throughput.
Re-running with the same settings skips completed shards; different settings are an error.

--workers N: each shard still to write is a task for one of N spawned processes (one torch
thread each, each with its own MTCNN on --device); the main process keeps the manifest and the
progress bar. The shards are the same (keys, order, bytes) for any N, so --workers and --device
are not settings of the output (--detect-batch and --detect-channels-last are: they change the last
float bits of detections). A killed run leaves only ``.tar.tmp`` files of the shards in progress, redone
next run. A manifest written before --detect-size / --detect-batch / --detect-channels-last existed means
--detect-size 0 --detect-batch 1 --no-detect-channels-last.

--distributor ray [--ray-address HOST:PORT]: the same per-shard tasks as Ray remote tasks (retried by Ray),
on the cluster at the address (the project installed on every node, inputs and --out on a shared
filesystem) or on a local instance of --workers CPUs; the driver keeps the manifest, skips and summary
as above, and the shards are the same bytes (datamodules/prepare/distributed.py).
"""
# (This docstring is the --help text of `uniportrait-prepare`, src/cli/prepare.py.)
# Modules: `config` (PrepareConfig, PrepareError, validation), `sources` (the input formats: one module per
# --format, `enumerate_inputs` dispatches), `image` (one input: decode, detect, select faces, caption, build
# the Sample), `shards` (shard files, manifest, resume checks), `run` (the driver: `prepare`).
