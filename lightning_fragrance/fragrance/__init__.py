"""fragrance."""
