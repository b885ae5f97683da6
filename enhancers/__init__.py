"""enhancers package."""
