"""The OpenAI wire format: request bodies (requests.py), responses and stream chunks (responses.py),
logprobs in both shapes (logprobs.py)."""
