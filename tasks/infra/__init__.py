"""Infrastructure the stages share: process pools, the Ray cluster, MLflow tracking, logging."""
