"""edge: an asyncio image service in front of object storage."""

__version__ = "0.1.0"

# Bumped whenever a change alters output pixels or headers: part of every cache key and ETag.
PIPELINE_VERSION = "1"
