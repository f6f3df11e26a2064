"""What every product shares: the params schema, expected errors, atomic artifacts,
orchestration, image loading and small tensor operations."""
