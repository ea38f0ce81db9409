"""Layer 6, above the stages: the KFP driver (compile, submit, run locally) and cluster
checks (`ipa cluster preflight`)."""
