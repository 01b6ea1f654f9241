"""Speed benchmarks: the tiny preset's CPU training step (`tiny_cpu`, `make bench`) and the SD1.5-scale
training and inference benchmark on random weights (`sd15`, `python -m src.bench_sd15`); `steps` holds what
both share. Each writes its table between markers in docs/benchmarks.md with machine, versions and date."""
