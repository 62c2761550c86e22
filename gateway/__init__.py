"""Octoroute gateway: OpenAI-compatible routing front-end over specialist experts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("octoroute")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
