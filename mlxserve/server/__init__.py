"""The OpenAI-compatible HTTP server: ``build_app(ServerConfig, AsyncEngine)``; ``mlxserve serve`` runs it."""
