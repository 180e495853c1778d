"""skyframe's own rules, processes and transfers, registered like any third-party plugin."""
