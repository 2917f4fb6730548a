"""OpenAI-compatible HTTP server (shipped as trainserve.server)."""
