"""Online retrieval: index shards, Serve deployments, FastAPI ingress and web page."""
