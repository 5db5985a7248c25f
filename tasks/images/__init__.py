"""Images: strict decoding (imageio), manifest rows as tensors (loaders), the decoded-image store (store)."""
