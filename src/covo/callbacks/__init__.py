"""Lightning callbacks: watchers that run beside the training loop."""
