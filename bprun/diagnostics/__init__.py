"""Instruments for seeing backpropagation at work: gradient flow, gradient checks, lr finder."""


def diagnostic_callbacks(settings, run_dir) -> list:
    """Trainer callbacks for the instruments switched on in `settings`."""
    return []
