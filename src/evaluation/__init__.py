"""The identity-preservation benchmark (FastComposer protocol, as in the UniPortrait paper): `make eval`,
`python -m src.evaluate` (options: src/cli/evaluate.py).

prompts.py               the fixed lists: 15 identities, 40 single-ID prompts, 21 / 12 / 12 prompts of 2 / 3 / 4
                         people, the identity groups of each split, published numbers
identities.py            BenchIdentity; real (reference photos) and synthetic (tiny world) identities
synthetic_recognizer.py  SyntheticFaceRecognizer: the synthetic world's face detector + embedding
jobs.py                  Job (one generation call, routed or unrouted), the image cache keyed by model and settings
scoring.py               ProtocolScores (single-ID Face Sim, CLIP), compute_fid
multi_scoring.py         SplitScores (one multi-ID split: MultiIdentityMetrics, CLIP, routing accuracy, sheet)
reports.py               results.md tables (Source column and break rows keep recognisers apart)
figures.py               results.png, each split's metric plot and contact sheet
benchmark.py             run: everything above, end to end
"""
