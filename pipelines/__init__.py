"""The batch stages of hashray (ingest, preprocess, train, encode, evaluate) and the CLI."""
