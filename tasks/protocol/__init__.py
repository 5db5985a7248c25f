"""The MLR protocol: down-sampled LR copies, train/test splits and the MLR manifest."""
