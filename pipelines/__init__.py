"""The batch stages of hashray: ingest, preprocess, train, encode, evaluate (Ray Data / Ray Train)."""
