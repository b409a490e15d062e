"""Problem sets and the prompt data module."""
