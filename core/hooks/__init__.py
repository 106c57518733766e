"""The plugin machinery: hook specifications, the plugin manager that loads plugins by entry
point and calls their hooks, and the slots providers fill."""
