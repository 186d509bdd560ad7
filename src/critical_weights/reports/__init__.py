"""What a person reads: the `export` stage's CSV, JSON, manifest and DVC metrics (export), the
`plot` stage's figures and the tables behind DVC's plots (plots), saving a PNG reproducibly
(figures), expert importance for Mixture-of-Experts models (experts), comparing two runs
(compare), and the offline template for `dvc plots show` (offline_plots). Torch-free.
"""
