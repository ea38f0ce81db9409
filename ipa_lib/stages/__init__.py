"""Layer 5, the stages of one round: pretrain, sample, gate, train, evaluate, select (best of a
sweep), register, promote, plus `smoke` (a backend contract check). Each takes typed config,
returns its typed result and writes its own outputs, so DVC, KFP and scripts get the same
files; `common` resolves the start model (registry URIs included) before the model factory."""
