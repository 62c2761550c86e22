"""Octoroute gateway: OpenAI-compatible routing front-end over specialist experts."""
