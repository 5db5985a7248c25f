"""The registered model and its uses: embeddings, the MLflow pyfunc model, promotion, search."""
