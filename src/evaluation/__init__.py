"""The identity-preservation benchmark (FastComposer protocol, as in the UniPortrait paper): `make eval`,
`python -m src.evaluate` (options: src/cli/evaluate.py).

prompts.py               the fixed lists: 15 identities, 40 single-ID and 21 multi-ID prompts, published numbers
identities.py            BenchIdentity; real (reference photos) and synthetic (tiny world) identities
synthetic_recognizer.py  SyntheticFaceRecognizer: the synthetic world's face detector + embedding
jobs.py                  Job (one generation call), the image cache keyed by model and settings
scoring.py               ProtocolScores (Face Sim, CLIP, routing accuracy), compute_fid
reports.py               results.md tables and results.png
benchmark.py             run: everything above, end to end
"""
