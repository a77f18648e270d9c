"""OpenAI-compatible HTTP server around `AsyncEngine` (`create_app`)."""
