"""One module per runtime.  Only ``concurrent`` is imported eagerly."""
