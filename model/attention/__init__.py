"""common/attention."""
