"""Wire schemas: the OpenAI-shaped requests and responses, shared by API and workers."""
