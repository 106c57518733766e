"""What every component runs on: options and config, controllers, status sections, metrics,
logging and the state directory."""
