"""Layer 4, the MLOps clients the stages use: MLflow tracking (stage runs under one round
run, lineage) and the model registry (pyfunc model, registration, guarded promotion with its
lock, `models:/` resolution)."""
