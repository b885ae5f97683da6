"""mediaserver package."""
