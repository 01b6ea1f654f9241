"""Speed benchmarks: the tiny preset's CPU training step (`tiny_cpu`, `make bench`), the SD1.5-scale training
and inference benchmark on random weights (`sd15`, `python -m src.bench_sd15`; how it measures: `measure`), and
the user's stage configs at real size on the CPU (`full_size`, `make full-size`); `steps` holds what they share.
Each writes its figures with machine, versions and date."""
