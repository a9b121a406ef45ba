"""The OpenAI-compatible HTTP layer. It validates, queues and relays; it never loads a model."""
