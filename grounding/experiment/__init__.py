"""An experiment's assembly, above the readers and the phantom world: settings, data sources, evaluation runs."""
