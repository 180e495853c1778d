"""skyframe's own rules and processes, registered like any third-party plugin."""
