"""Quality evaluation of enhancement stages on real recordings."""
