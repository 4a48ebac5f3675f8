"""The core of discoverd: data model, hook specifications, interfaces, plugin manager,
configuration, reconcile loops and templating. Plugins import from here (or from the
``discoverd`` package root), never from one another."""
