"""meshagent's built-in plugins, loaded through the ``meshagent.plugins`` entry-point group."""
