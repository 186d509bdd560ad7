"""The `validate` stage (stage): which weights to perturb and their controls, decided from the
shards alone (selection), perturbing weights in place and restoring them bit-exactly
(perturbation), measuring a model's loss (evaluation), loading the model checked against the
shards (checked), the damage of each set against its controls (damage), how well each metric
predicts the damage it ranks (predictiveness), and the report (report) and figures (figures).
"""
