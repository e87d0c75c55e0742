"""The contract between the coordinating server and hospital nodes: features, models, record keys, codecs."""
