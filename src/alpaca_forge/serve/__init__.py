"""`alpaca-forge serve`: an OpenAI-compatible API and an offline chat page over any engine."""
